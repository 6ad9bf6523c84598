//! Who may do what: the identity of a request and the rules of a resource.
//!
//! **Identity.** Every request has a [`Principal`], recorded with the
//! events it appends. Where it comes from is chosen per [`Api`]:
//!
//! - anonymous (the default, for trying things out): every request is
//!   `anonymous`, whatever headers it carries, and the resource rules are
//!   not asked, since nothing tells one caller from another;
//! - bearer JWTs ([`Api::authenticate`]): the token's subject and roles;
//! - a trusted header ([`Api::trust_principal_header`]): the header's value,
//!   for a service behind a gateway that authenticates and removes the
//!   header from what clients send, with roles from a second header when
//!   [`Api::trust_roles_header`] names one. Anyone who can reach the
//!   service directly can claim any name and role, which is why it is off
//!   unless asked for;
//! - a function of the request ([`Api::principal`]), for anything else.
//!
//! **Rules.** A [`Resource`](crate::Resource) says who may run each write
//! from the principal and the aggregate's current state
//! ([`Resource::allow`](crate::Resource::allow)), or from those and the
//! command ([`Resource::allow_command`](crate::Resource::allow_command)),
//! and who may read
//! ([`Resource::allow_reads`](crate::Resource::allow_reads)). A refusal is
//! `403` with a problem document naming the rule, decided before the
//! aggregate's `handle` runs and on the very state the events would follow
//! ([`CommandBus::execute_guarded`](kes_core::CommandBus::execute_guarded)),
//! and it appends nothing. An operation without a rule is open to every
//! caller the API lets in. The OpenAPI document lists each rule as the
//! `403` answer of its operation.
//!
//! [`Api`]: crate::Api
//! [`Api::authenticate`]: crate::Api::authenticate
//! [`Api::trust_principal_header`]: crate::Api::trust_principal_header
//! [`Api::trust_roles_header`]: crate::Api::trust_roles_header
//! [`Api::principal`]: crate::Api::principal

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::auth::Principal;
use crate::error::HttpError;

/// The principal recorded for requests of an API without identities.
pub const ANONYMOUS: &str = "anonymous";

/// A rule on a write: whether `principal` may run `command` on `state`.
type WriteCheck<S, C> = Arc<dyn Fn(&Principal, &S, &C) -> bool + Send + Sync>;
/// A rule on reads: whether `principal` may read.
type ReadCheck = Arc<dyn Fn(&Principal) -> bool + Send + Sync>;

/// One rule: what it says (shown in `403` answers and in OpenAPI) and how
/// it is checked.
pub(crate) struct Rule<C> {
    pub(crate) text: String,
    pub(crate) check: C,
}

impl<C: Clone> Clone for Rule<C> {
    fn clone(&self) -> Self {
        Self { text: self.text.clone(), check: self.check.clone() }
    }
}

/// The rules of one resource, over its state `S` and commands `C`.
pub(crate) struct Rules<S, C> {
    pub(crate) reads: Option<Rule<ReadCheck>>,
    /// By operation name: `create`, `replace`, `patch`, `delete` or a
    /// named command.
    pub(crate) writes: BTreeMap<String, Rule<WriteCheck<S, C>>>,
}

impl<S, C> Default for Rules<S, C> {
    fn default() -> Self {
        Self { reads: None, writes: BTreeMap::new() }
    }
}

impl<S, C> Clone for Rules<S, C> {
    fn clone(&self) -> Self {
        Self { reads: self.reads.clone(), writes: self.writes.clone() }
    }
}

impl<S, C> fmt::Debug for Rules<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rules")
            .field("reads", &self.reads.as_ref().map(|r| &r.text))
            .field("writes", &self.writes.iter().map(|(op, r)| (op, &r.text)).collect::<Vec<_>>())
            .finish()
    }
}

impl<S, C> Rules<S, C> {
    pub(crate) fn add_write(
        &mut self,
        operation: String,
        text: String,
        check: impl Fn(&Principal, &S, &C) -> bool + Send + Sync + 'static,
    ) {
        self.writes.insert(operation, Rule { text, check: Arc::new(check) });
    }

    pub(crate) fn set_reads(&mut self, text: String, check: impl Fn(&Principal) -> bool + Send + Sync + 'static) {
        self.reads = Some(Rule { text, check: Arc::new(check) });
    }

    /// Whether `caller` may read; `None` (an API without identities) asks no rule.
    pub(crate) fn check_read(&self, caller: Option<&Principal>) -> Result<(), HttpError> {
        match (&self.reads, caller) {
            (Some(rule), Some(caller)) if !(rule.check)(caller) => Err(HttpError::Forbidden(rule.text.clone())),
            _ => Ok(()),
        }
    }

    /// The guard of `operation` for `caller`, for
    /// [`CommandBus::execute_guarded`](kes_core::CommandBus::execute_guarded):
    /// `None` when no rule applies. It borrows the rule and the caller, so
    /// a command costs no copy of either; only a refusal writes the text.
    pub(crate) fn write_guard<'a>(
        &'a self,
        operation: &str,
        caller: Option<&'a Principal>,
    ) -> Option<impl Fn(&S, &C) -> Result<(), String> + Send + Sync + 'a> {
        let rule = self.writes.get(operation)?;
        let caller = caller?;
        Some(
            move |state: &S, command: &C| {
                if (rule.check)(caller, state, command) { Ok(()) } else { Err(rule.text.clone()) }
            },
        )
    }

    /// Whether reads have a rule (without one, nobody's identity is needed).
    pub(crate) fn guards_reads(&self) -> bool {
        self.reads.is_some()
    }

    /// The text of the rule on `operation`, for OpenAPI.
    pub(crate) fn write_text(&self, operation: &str) -> Option<&str> {
        self.writes.get(operation).map(|r| r.text.as_str())
    }

    pub(crate) fn read_text(&self) -> Option<&str> {
        self.reads.as_ref().map(|r| r.text.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann() -> Principal {
        Principal { subject: "ann".into(), roles: vec!["member".into()] }
    }

    #[test]
    fn a_rule_is_asked_only_when_callers_have_identities() {
        let mut rules = Rules::<String, u32>::default();
        rules.set_reads("members only".into(), |p| p.has_role("member"));
        rules.add_write("rename".into(), "only the owner, below 10".into(), |p, owner: &String, n: &u32| {
            &p.subject == owner && *n < 10
        });
        assert!(rules.check_read(Some(&ann())).is_ok());
        let bob = Principal { subject: "bob".into(), roles: vec![] };
        assert!(matches!(rules.check_read(Some(&bob)), Err(HttpError::Forbidden(t)) if t == "members only"));
        assert!(rules.check_read(None).is_ok(), "anonymous APIs ask no rule");

        let ann = ann();
        let guard = rules.write_guard("rename", Some(&ann)).expect("a rule");
        assert_eq!(guard(&"ann".to_owned(), &1), Ok(()));
        assert_eq!(guard(&"bob".to_owned(), &1), Err("only the owner, below 10".to_owned()));
        assert_eq!(guard(&"ann".to_owned(), &10), Err("only the owner, below 10".to_owned()), "the command counts");
        assert!(rules.write_guard("rename", None).is_none());
        assert!(rules.write_guard("delete", Some(&ann)).is_none(), "no rule, no guard");
    }
}
