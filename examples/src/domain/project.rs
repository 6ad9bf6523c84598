//! A project: the seed's aggregate, with rules worth the name.

use std::collections::BTreeSet;

use chrono::NaiveDate;
use kes_core::{Aggregate, DomainEvent, Personal, Upcast, Upcasters};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a project is in its life.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being prepared; the seed's bare `POST /projects/` makes one.
    #[default]
    Draft,
    /// Under way.
    Active,
    /// Put away: takes no change but `restore`.
    Archived,
}

impl Status {
    /// The status as the list view stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Active => "active",
            Self::Archived => "archived",
        }
    }
}

/// The currency of budgets that name none: every budget before
/// `ProjectCreated` and `ProjectBudgetSet` revision 2 was in euros.
pub const DEFAULT_CURRENCY: &str = "EUR";

/// A sum of money: whole units of a currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    /// Whole units; never negative in a budget.
    pub amount: i64,
    /// ISO 4217 code: three capital letters.
    pub currency: String,
}

/// The latest state of a project, as `GET /projects/{id}` shows it.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Project {
    /// Whether the project was created (a fresh id is not a project).
    #[serde(default)]
    pub created: bool,
    /// Its name; `None` for the unnamed draft of a bare create.
    pub name: Option<String>,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Draft, active or archived.
    #[serde(default)]
    pub status: Status,
    /// What it was before it was archived, so `restore` goes back there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_from: Option<Status>,
    /// The budget in whole units of `currency`; never negative.
    #[serde(default)]
    pub budget: i64,
    /// The currency of the budget (ISO 4217).
    #[serde(default)]
    pub currency: String,
    /// Who answers for it: personal data of the owner.
    pub owner: Option<Personal<String>>,
    /// Who works on it, each member once, in the order they joined:
    /// personal data of each member.
    #[serde(default)]
    pub members: Vec<Personal<String>>,
    /// Labels for finding it.
    #[serde(default)]
    pub tags: BTreeSet<String>,
    /// When it is due.
    pub due: Option<NaiveDate>,
    /// Whether it was deleted (its history stays).
    #[serde(default)]
    pub deleted: bool,
}

/// What can be asked of a project.
#[derive(Debug, Clone, PartialEq)]
pub enum ProjectCommand {
    /// Create it. A missing name makes an unnamed draft; a blank one is refused.
    Create(ProjectFields),
    /// Change the given fields (PATCH).
    Update(ProjectFields),
    /// Replace every editable field (PUT): absent ones are cleared.
    Replace(ProjectFields),
    /// Start it: draft → active. Needs a name.
    Activate,
    /// Put it away: draft or active → archived.
    Archive,
    /// Take it back out: archived → the status it had.
    Restore,
    /// Add a member, by name.
    AddMember(String),
    /// Remove a member, by name or (once the member is erased) by
    /// subject id.
    RemoveMember(String),
    /// Delete it.
    Delete,
}

/// The editable fields of a project; `None` means "not given".
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectFields {
    /// The name; never blank.
    #[serde(default)]
    #[schemars(extend("pattern" = super::NOT_BLANK))]
    pub name: Option<String>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Whole currency units, ≥ 0.
    #[serde(default)]
    pub budget: Option<i64>,
    /// The budget's currency: an ISO 4217 code (`EUR` when a project is
    /// created without one).
    #[serde(default)]
    #[schemars(extend("pattern" = "^[A-Z]{3}$"))]
    pub currency: Option<String>,
    /// Who answers for it.
    #[serde(default)]
    pub owner: Option<String>,
    /// Labels.
    #[serde(default)]
    pub tags: Option<BTreeSet<String>>,
    /// When it is due (YYYY-MM-DD).
    #[serde(default)]
    pub due: Option<NaiveDate>,
}

/// What happened to a project. Names are in the past tense.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProjectEvent {
    /// It was created.
    Created {
        /// Its name, if it had one.
        name: Option<String>,
        /// Description.
        description: String,
        /// Budget (a bare number before revision 2: see [`ProjectEvent::upcasters`]).
        budget: Money,
        /// Owner.
        owner: Option<Personal<String>>,
        /// Tags.
        tags: BTreeSet<String>,
        /// Due date.
        due: Option<NaiveDate>,
    },
    /// It got a new name.
    Renamed {
        /// The new name.
        name: String,
    },
    /// Its description changed.
    DescriptionChanged {
        /// The new description.
        description: String,
    },
    /// Its budget (amount or currency) was set.
    BudgetSet {
        /// The new budget (a bare number before revision 2).
        budget: Money,
    },
    /// Its owner changed.
    OwnerChanged {
        /// The new owner, or none.
        owner: Option<Personal<String>>,
    },
    /// Its tags were replaced.
    TagsSet {
        /// The new tags.
        tags: BTreeSet<String>,
    },
    /// Its due date changed.
    DueDateSet {
        /// The new due date, or none.
        due: Option<NaiveDate>,
    },
    /// It started.
    Activated,
    /// It was archived.
    Archived,
    /// It was restored from the archive.
    Restored,
    /// A member joined.
    MemberAdded {
        /// Who.
        member: Personal<String>,
    },
    /// A member left.
    MemberRemoved {
        /// Who.
        member: Personal<String>,
    },
    /// It was deleted.
    Deleted,
    /// A person whose data it holds was forgotten: their values now read
    /// as erased. Holds no personal data.
    SubjectErased {
        /// The erased subject's id.
        subject: String,
    },
}

impl DomainEvent for ProjectEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Created { .. } => "ProjectCreated",
            Self::Renamed { .. } => "ProjectRenamed",
            Self::DescriptionChanged { .. } => "ProjectDescriptionChanged",
            Self::BudgetSet { .. } => "ProjectBudgetSet",
            Self::OwnerChanged { .. } => "ProjectOwnerChanged",
            Self::TagsSet { .. } => "ProjectTagsSet",
            Self::DueDateSet { .. } => "ProjectDueDateSet",
            Self::Activated => "ProjectActivated",
            Self::Archived => "ProjectArchived",
            Self::Restored => "ProjectRestored",
            Self::MemberAdded { .. } => "ProjectMemberAdded",
            Self::MemberRemoved { .. } => "ProjectMemberRemoved",
            Self::Deleted => "ProjectDeleted",
            Self::SubjectErased { .. } => "ProjectSubjectErased",
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

    /// Revision 2 of `ProjectCreated` and `ProjectBudgetSet` carries the
    /// budget as [`Money`]; revision 1 had a bare number.
    fn revision(&self) -> u32 {
        match self {
            Self::Created { .. } | Self::BudgetSet { .. } => 2,
            _ => 1,
        }
    }

    /// Revision 1 budgets were numbers, all in [`DEFAULT_CURRENCY`].
    fn upcasters() -> Upcasters {
        Upcasters::new()
            .register("ProjectCreated", 1, |payload| budget_with_currency(payload, "ProjectCreated", "Created"))
            .register("ProjectBudgetSet", 1, |payload| budget_with_currency(payload, "ProjectBudgetSet", "BudgetSet"))
    }
}

/// Revision 1 → 2 of an event whose `budget` was a number: it becomes
/// `{amount, currency}` in [`DEFAULT_CURRENCY`]. A payload of another shape
/// is refused by name, without its values.
fn budget_with_currency(mut payload: serde_json::Value, event_type: &str, variant: &str) -> Result<Upcast, String> {
    let budget = payload
        .get_mut(variant)
        .and_then(|fields| fields.get_mut("budget"))
        .ok_or_else(|| format!("{variant}.budget is missing"))?;
    let amount = budget.as_i64().ok_or_else(|| format!("{variant}.budget is not a whole number"))?;
    *budget = serde_json::json!({ "amount": amount, "currency": DEFAULT_CURRENCY });
    Ok(Upcast { event_type: event_type.to_owned(), payload })
}

/// Why a project refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProjectError {
    /// Create on an existing project.
    #[error("the project already exists")]
    AlreadyExists,
    /// A change to a project that was never created.
    #[error("the project does not exist")]
    NotCreated,
    /// A blank name.
    #[error("a project name cannot be blank")]
    BlankName,
    /// A negative budget.
    #[error("a budget cannot be negative (got {0})")]
    NegativeBudget(i64),
    /// A currency that is not three capital letters.
    #[error("a currency is an ISO 4217 code: three capital letters")]
    BadCurrency,
    /// Any change to an archived project but `restore`.
    #[error("the project is archived: restore it first")]
    Archived,
    /// A status change that does not exist.
    #[error("a {from} project cannot be {action}")]
    BadTransition {
        /// The current status.
        from: &'static str,
        /// What was asked.
        action: &'static str,
    },
    /// Activating a project without a name.
    #[error("name the project before activating it")]
    Unnamed,
    /// Adding a member twice. (Errors never quote personal data: they may
    /// be logged.)
    #[error("already a member")]
    AlreadyMember,
    /// Removing someone who is not a member.
    #[error("not a member")]
    NotMember,
    /// A blank member name.
    #[error("a member name cannot be blank")]
    BlankMember,
}

fn clean_name(name: &str) -> Result<String, ProjectError> {
    let trimmed = name.trim();
    if trimmed.is_empty() { Err(ProjectError::BlankName) } else { Ok(trimmed.to_owned()) }
}

/// A PATCH keeps an absent field; a PUT resets it to `cleared`.
fn or_clear<T>(replace: bool, given: Option<T>, cleared: T) -> Option<T> {
    if replace { given.or(Some(cleared)) } else { given }
}

fn check_budget(budget: i64) -> Result<i64, ProjectError> {
    if budget < 0 { Err(ProjectError::NegativeBudget(budget)) } else { Ok(budget) }
}

fn check_currency(currency: String) -> Result<String, ProjectError> {
    let code = currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase());
    if code { Ok(currency) } else { Err(ProjectError::BadCurrency) }
}

impl Project {
    /// The events that move the editable fields to `fields`; with
    /// `replace`, absent fields are cleared rather than kept.
    fn changes(&self, fields: ProjectFields, replace: bool) -> Result<Vec<ProjectEvent>, ProjectError> {
        let mut events = Vec::new();
        match fields.name {
            Some(name) => {
                let name = clean_name(&name)?;
                if self.name.as_deref() != Some(name.as_str()) {
                    events.push(ProjectEvent::Renamed { name });
                }
            }
            None if replace => return Err(ProjectError::BlankName),
            None => {}
        }
        if let Some(description) = or_clear(replace, fields.description, String::new())
            && description != self.description
        {
            events.push(ProjectEvent::DescriptionChanged { description });
        }
        let amount = or_clear(replace, fields.budget, 0).map(check_budget).transpose()?;
        let currency =
            or_clear(replace, fields.currency, DEFAULT_CURRENCY.to_owned()).map(check_currency).transpose()?;
        if amount.is_some() || currency.is_some() {
            let budget = Money {
                amount: amount.unwrap_or(self.budget),
                currency: currency.unwrap_or_else(|| self.currency.clone()),
            };
            if budget.amount != self.budget || budget.currency != self.currency {
                events.push(ProjectEvent::BudgetSet { budget });
            }
        }
        let owner = if replace { Some(fields.owner) } else { fields.owner.map(Some) };
        if let Some(owner) = owner {
            let owner = owner.map(|o| o.trim().to_owned()).filter(|o| !o.is_empty());
            if owner.as_ref() != self.owner_name() || self.owner.as_ref().is_some_and(Personal::is_erased) {
                events.push(ProjectEvent::OwnerChanged { owner: owner.map(person) });
            }
        }
        if let Some(tags) = or_clear(replace, fields.tags, BTreeSet::new()) {
            let tags = clean_tags(tags);
            if tags != self.tags {
                events.push(ProjectEvent::TagsSet { tags });
            }
        }
        let due = if replace { Some(fields.due) } else { fields.due.map(Some) };
        if let Some(due) = due
            && due != self.due
        {
            events.push(ProjectEvent::DueDateSet { due });
        }
        Ok(events)
    }
}

/// A name as personal data of the person it names.
fn person(name: String) -> Personal<String> {
    Personal::new(name.clone(), name)
}

impl Project {
    /// The owner's name, while it is readable.
    pub fn owner_name(&self) -> Option<&String> {
        self.owner.as_ref().and_then(Personal::value)
    }

    /// Whether `name` is a member.
    pub fn has_member(&self, name: &str) -> bool {
        self.members.iter().any(|m| m.value().is_some_and(|v| v == name))
    }
}

/// Tags without surrounding blanks; empty ones dropped.
fn clean_tags(tags: BTreeSet<String>) -> BTreeSet<String> {
    tags.into_iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect()
}

impl Aggregate for Project {
    const NAME: &'static str = "project";
    /// 2: states have a `currency`. A state of version 1 would still
    /// decode, with no currency, so tables built by it are rebuilt.
    const STATE_VERSION: u32 = 2;
    /// Owners and members are personal data.
    const PERSONAL_DATA: bool = true;
    type Command = ProjectCommand;
    type Event = ProjectEvent;
    type Error = ProjectError;

    fn handle(&self, command: ProjectCommand) -> Result<Vec<ProjectEvent>, ProjectError> {
        if let ProjectCommand::Create(f) = command {
            if self.created {
                return Err(ProjectError::AlreadyExists);
            }
            return Ok(vec![ProjectEvent::Created {
                name: f.name.as_deref().map(clean_name).transpose()?,
                description: f.description.unwrap_or_default(),
                budget: Money {
                    amount: check_budget(f.budget.unwrap_or(0))?,
                    currency: check_currency(f.currency.unwrap_or_else(|| DEFAULT_CURRENCY.to_owned()))?,
                },
                owner: f.owner.map(|o| o.trim().to_owned()).filter(|o| !o.is_empty()).map(person),
                tags: f.tags.map(clean_tags).unwrap_or_default(),
                due: f.due,
            }]);
        }
        if !self.created || self.deleted {
            return Err(ProjectError::NotCreated);
        }
        if self.status == Status::Archived && command != ProjectCommand::Restore {
            return Err(ProjectError::Archived);
        }
        let from = self.status.as_str();
        match command {
            ProjectCommand::Create(_) => Err(ProjectError::AlreadyExists),
            ProjectCommand::Update(fields) => self.changes(fields, false),
            ProjectCommand::Replace(fields) => self.changes(fields, true),
            ProjectCommand::Activate => match self.status {
                Status::Draft if self.name.is_none() => Err(ProjectError::Unnamed),
                Status::Draft => Ok(vec![ProjectEvent::Activated]),
                _ => Err(ProjectError::BadTransition { from, action: "activated" }),
            },
            ProjectCommand::Archive => Ok(vec![ProjectEvent::Archived]),
            ProjectCommand::Restore => match self.status {
                Status::Archived => Ok(vec![ProjectEvent::Restored]),
                _ => Err(ProjectError::BadTransition { from, action: "restored" }),
            },
            ProjectCommand::AddMember(member) => {
                let member = member.trim().to_owned();
                if member.is_empty() {
                    Err(ProjectError::BlankMember)
                } else if self.has_member(&member) {
                    Err(ProjectError::AlreadyMember)
                } else {
                    Ok(vec![ProjectEvent::MemberAdded { member: person(member) }])
                }
            }
            ProjectCommand::RemoveMember(member) => {
                // By name, or by subject id once the name is erased.
                match self.members.iter().find(|m| m.is(member.trim())) {
                    Some(found) => Ok(vec![ProjectEvent::MemberRemoved { member: found.clone() }]),
                    None => Err(ProjectError::NotMember),
                }
            }
            ProjectCommand::Delete => Ok(vec![ProjectEvent::Deleted]),
        }
    }

    fn apply(&mut self, event: &ProjectEvent) {
        match event {
            ProjectEvent::Created { name, description, budget, owner, tags, due } => {
                self.created = true;
                self.name = name.clone();
                self.description = description.clone();
                self.budget = budget.amount;
                self.currency = budget.currency.clone();
                self.owner = owner.clone();
                self.tags = tags.clone();
                self.due = *due;
            }
            ProjectEvent::Renamed { name } => self.name = Some(name.clone()),
            ProjectEvent::DescriptionChanged { description } => self.description = description.clone(),
            ProjectEvent::BudgetSet { budget } => {
                self.budget = budget.amount;
                self.currency = budget.currency.clone();
            }
            ProjectEvent::OwnerChanged { owner } => self.owner = owner.clone(),
            ProjectEvent::TagsSet { tags } => self.tags = tags.clone(),
            ProjectEvent::DueDateSet { due } => self.due = *due,
            ProjectEvent::Activated => self.status = Status::Active,
            ProjectEvent::Archived => {
                self.archived_from = Some(self.status);
                self.status = Status::Archived;
            }
            ProjectEvent::Restored => self.status = self.archived_from.take().unwrap_or(Status::Active),
            ProjectEvent::MemberAdded { member } => {
                if !self.members.contains(member) {
                    self.members.push(member.clone());
                }
            }
            ProjectEvent::MemberRemoved { member } => self.members.retain(|m| m != member),
            ProjectEvent::Deleted => self.deleted = true,
            // The values stay sealed; their key is gone, so every read
            // shows them erased.
            ProjectEvent::SubjectErased { .. } => {}
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

    fn created(name: Option<&str>) -> ProjectEvent {
        ProjectEvent::Created {
            name: name.map(str::to_owned),
            description: String::new(),
            budget: Money { amount: 0, currency: DEFAULT_CURRENCY.into() },
            owner: None,
            tags: BTreeSet::new(),
            due: None,
        }
    }

    fn named(name: &str) -> ProjectFields {
        ProjectFields { name: Some(name.into()), ..ProjectFields::default() }
    }

    #[test]
    fn a_bare_create_makes_an_unnamed_draft() {
        TestFramework::<Project>::given_no_previous_events()
            .when(ProjectCommand::Create(ProjectFields::default()))
            .then_expect_state(|p| {
                assert!(p.created && p.name.is_none());
                assert_eq!(p.status, Status::Draft);
            });
    }

    #[test]
    fn names_are_never_blank() {
        TestFramework::<Project>::given_no_previous_events()
            .when(ProjectCommand::Create(named("   ")))
            .then_expect_error(ProjectError::BlankName);
        TestFramework::<Project>::given(vec![created(None)])
            .when(ProjectCommand::Update(named("")))
            .then_expect_error(ProjectError::BlankName);
    }

    #[test]
    fn patch_emits_one_event_per_changed_field_only() {
        let fields = ProjectFields { name: Some("x".into()), budget: Some(5), ..ProjectFields::default() };
        TestFramework::<Project>::given(vec![created(Some("x"))])
            .when(ProjectCommand::Update(fields))
            .then_expect_events(vec![ProjectEvent::BudgetSet {
                budget: Money { amount: 5, currency: DEFAULT_CURRENCY.into() },
            }]);
    }

    #[test]
    fn budgets_are_never_negative() {
        let fields = ProjectFields { budget: Some(-1), ..ProjectFields::default() };
        TestFramework::<Project>::given(vec![created(Some("x"))])
            .when(ProjectCommand::Update(fields))
            .then_expect_error(ProjectError::NegativeBudget(-1));
    }

    #[test]
    fn an_archived_project_takes_nothing_but_restore() {
        let archived = vec![created(Some("x")), ProjectEvent::Activated, ProjectEvent::Archived];
        TestFramework::<Project>::given(archived.clone())
            .when(ProjectCommand::Update(named("y")))
            .then_expect_error(ProjectError::Archived);
        TestFramework::<Project>::given(archived.clone())
            .when(ProjectCommand::Delete)
            .then_expect_error(ProjectError::Archived);
        TestFramework::<Project>::given(archived)
            .when(ProjectCommand::Restore)
            .then_expect_state(|p| assert_eq!(p.status, Status::Active, "restore goes back to where it was"));
    }

    #[test]
    fn status_moves_draft_active_archived_and_back() {
        TestFramework::<Project>::given(vec![created(None)])
            .when(ProjectCommand::Activate)
            .then_expect_error(ProjectError::Unnamed);
        TestFramework::<Project>::given(vec![created(Some("x")), ProjectEvent::Activated])
            .when(ProjectCommand::Activate)
            .then_expect_error(ProjectError::BadTransition { from: "active", action: "activated" });
        TestFramework::<Project>::given(vec![created(Some("x")), ProjectEvent::Archived])
            .when(ProjectCommand::Restore)
            .then_expect_state(|p| assert_eq!(p.status, Status::Draft));
    }

    #[test]
    fn a_member_is_added_once() {
        TestFramework::<Project>::given(vec![
            created(Some("x")),
            ProjectEvent::MemberAdded { member: person("ann".into()) },
        ])
        .when(ProjectCommand::AddMember(" ann ".into()))
        .then_expect_error(ProjectError::AlreadyMember);
        TestFramework::<Project>::given(vec![created(Some("x"))])
            .when(ProjectCommand::RemoveMember("bob".into()))
            .then_expect_error(ProjectError::NotMember);
        TestFramework::<Project>::given(vec![
            created(Some("x")),
            ProjectEvent::MemberAdded { member: person("ann".into()) },
        ])
        .when(ProjectCommand::RemoveMember("ann".into()))
        .then_expect_events(vec![ProjectEvent::MemberRemoved { member: person("ann".into()) }]);
    }

    #[test]
    fn create_cleans_tags_like_an_update() {
        let fields = ProjectFields {
            tags: Some(BTreeSet::from([" a ".to_owned(), String::new(), "b".to_owned()])),
            ..ProjectFields::default()
        };
        TestFramework::<Project>::given(vec![]).when(ProjectCommand::Create(fields)).then_expect_state(|p| {
            assert_eq!(p.tags, BTreeSet::from(["a".to_owned(), "b".to_owned()]));
        });
    }

    #[test]
    fn replace_clears_what_it_does_not_name() {
        let start = ProjectEvent::Created {
            name: Some("x".into()),
            description: "d".into(),
            budget: Money { amount: 3, currency: "USD".into() },
            owner: Some(person("ann".into())),
            tags: BTreeSet::from(["t".to_owned()]),
            due: None,
        };
        TestFramework::<Project>::given(vec![start]).when(ProjectCommand::Replace(named("x"))).then_expect_state(|p| {
            assert_eq!((p.description.as_str(), p.budget, p.owner_name().map(String::as_str)), ("", 0, None));
            assert_eq!(p.currency, DEFAULT_CURRENCY, "a PUT without a currency goes back to the default");
            assert!(p.tags.is_empty());
        });
    }

    #[test]
    fn a_currency_alone_moves_the_budget_and_must_be_a_code() {
        let usd = ProjectFields { currency: Some("USD".into()), ..ProjectFields::default() };
        TestFramework::<Project>::given(vec![
            created(Some("x")),
            ProjectEvent::BudgetSet { budget: Money { amount: 9, currency: DEFAULT_CURRENCY.into() } },
        ])
        .when(ProjectCommand::Update(usd))
        .then_expect_events(vec![ProjectEvent::BudgetSet { budget: Money { amount: 9, currency: "USD".into() } }]);
        for bad in ["usd", "EURO", "", "E1R"] {
            let fields = ProjectFields { currency: Some(bad.into()), ..ProjectFields::default() };
            TestFramework::<Project>::given(vec![created(Some("x"))])
                .when(ProjectCommand::Update(fields))
                .then_expect_error(ProjectError::BadCurrency);
        }
    }

    #[test]
    fn revision_1_budgets_are_read_as_euros() {
        use kes_core::{Codec, JsonCodec};
        let codec = JsonCodec::<ProjectEvent>::default();
        let created = br#"{"Created":{"name":"a","description":"","budget":120,"owner":null,"tags":[],"due":null}}"#;
        match codec.decode("ProjectCreated", 1, created).expect("an upcast r1 event") {
            ProjectEvent::Created { budget, .. } => assert_eq!(budget, Money { amount: 120, currency: "EUR".into() }),
            other => panic!("{other:?}"),
        }
        let set = codec.decode("ProjectBudgetSet", 1, br#"{"BudgetSet":{"budget":7}}"#).expect("an upcast r1 event");
        assert_eq!(set, ProjectEvent::BudgetSet { budget: Money { amount: 7, currency: "EUR".into() } });
        // Revision 2 is read as it is; another shape at revision 1 is a
        // typed error naming the field, not its value.
        let current = br#"{"BudgetSet":{"budget":{"amount":7,"currency":"USD"}}}"#;
        assert!(codec.decode("ProjectBudgetSet", 2, current).is_ok());
        let err = codec.decode("ProjectBudgetSet", 1, br#"{"BudgetSet":{"budget":"secret"}}"#).unwrap_err();
        assert!(err.reason.contains("BudgetSet.budget") && !err.reason.contains("secret"), "{err}");
    }

    #[test]
    fn upcasters_carry_personal_data_nodes_whole() {
        use kes_core::{Codec, JsonCodec};
        let codec = JsonCodec::<ProjectEvent>::default();
        // A revision 1 event whose owner was sealed, then erased: the
        // upcaster rewrites the budget and leaves the nodes alone.
        let sealed = r#"{"$p":{"s":"s1","k":"k1","f":"/Created/owner","n":"bm9uY2U","c":"Y2lwaGVy"}}"#;
        let erased = r#"{"$p":{"s":"s2","x":true}}"#;
        for node in [sealed, erased] {
            let payload = format!(
                r#"{{"Created":{{"name":"a","description":"","budget":5,"owner":{node},"tags":[],"due":null}}}}"#
            );
            let event = codec.decode("ProjectCreated", 1, payload.as_bytes()).expect("an upcast r1 event");
            let ProjectEvent::Created { owner: Some(owner), budget, .. } = event else { panic!("{event:?}") };
            assert_eq!(budget, Money { amount: 5, currency: "EUR".into() });
            assert_eq!(owner.value(), None);
            assert_eq!(serde_json::to_value(&owner).unwrap(), serde_json::from_str::<serde_json::Value>(node).unwrap());
        }
    }

    #[test]
    fn nothing_happens_to_a_project_never_created_or_deleted() {
        TestFramework::<Project>::given_no_previous_events()
            .when(ProjectCommand::Archive)
            .then_expect_error(ProjectError::NotCreated);
        TestFramework::<Project>::given(vec![created(Some("x")), ProjectEvent::Deleted])
            .when(ProjectCommand::Update(named("y")))
            .then_expect_error(ProjectError::NotCreated);
    }
}
