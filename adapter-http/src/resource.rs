//! How HTTP maps onto one aggregate: its route name, which request bodies
//! become which commands, and how new ids are made.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use kes_core::Aggregate;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::access::Rules;
use crate::auth::Principal;
use crate::error::{ConfigError, HttpError};

/// Turns a decoded JSON body (and the aggregate id) into a command.
type DecodeFn<C> = Arc<dyn Fn(&str, Value) -> Result<C, HttpError> + Send + Sync>;
/// Writes the JSON Schema of a body type into a generator.
pub(crate) type SchemaFn = Arc<dyn Fn(&mut SchemaGenerator) -> Schema + Send + Sync>;

/// One body-to-command mapping.
pub(crate) struct Operation<C> {
    decode: DecodeFn<C>,
    /// The body's JSON Schema, compiled: a body is checked against exactly
    /// what the OpenAPI document says before it is decoded.
    validator: Option<Arc<jsonschema::Validator>>,
    /// Scalar types of the body's top-level fields, for form bodies.
    coercions: BTreeMap<String, Scalars>,
    /// The body's JSON Schema, `None` for operations without a body.
    pub(crate) schema: Option<SchemaFn>,
    /// Doc comment of the body type (its schema's description), for OpenAPI.
    pub(crate) description: Option<String>,
}

impl<C> Clone for Operation<C> {
    fn clone(&self) -> Self {
        Self {
            decode: Arc::clone(&self.decode),
            validator: self.validator.clone(),
            coercions: self.coercions.clone(),
            schema: self.schema.clone(),
            description: self.description.clone(),
        }
    }
}

impl<C> Operation<C> {
    fn with_body<B, F>(f: F) -> Self
    where
        B: DeserializeOwned + JsonSchema + 'static,
        F: Fn(&str, B) -> C + Send + Sync + 'static,
    {
        let root = schemars::schema_for!(B);
        let coercions = scalar_fields(root.as_value());
        let description = root.get("description").and_then(Value::as_str).map(str::to_owned);
        // A schema schemars wrote always compiles; if one ever did not,
        // serde's decoding still guards the command.
        let mut checked = root.as_value().clone();
        crate::openapi::bound_integers(&mut checked, 0);
        let validator = match jsonschema::draft202012::options().build(&checked) {
            Ok(v) => Some(Arc::new(v)),
            Err(e) => {
                tracing::error!(body = std::any::type_name::<B>(), error = %e, "the body's JSON Schema does not compile");
                None
            }
        };
        Self {
            decode: Arc::new(move |id, value| {
                let body = decode_body::<B>(value)?;
                Ok(f(id, body))
            }),
            validator,
            coercions,
            schema: Some(Arc::new(|g: &mut SchemaGenerator| g.subschema_for::<B>())),
            description,
        }
    }

    fn without_body(f: impl Fn(&str) -> C + Send + Sync + 'static) -> Self {
        Self {
            decode: Arc::new(move |id, _| Ok(f(id))),
            validator: None,
            coercions: BTreeMap::new(),
            schema: None,
            description: None,
        }
    }

    /// Builds the command from a parsed body, once the body has met its
    /// JSON Schema (the one the OpenAPI document shows).
    pub(crate) fn command(&self, id: &str, mut body: Value) -> Result<C, HttpError> {
        if let Some(validator) = &self.validator {
            if let Err(e) = validator.validate(&body) {
                // An empty body is "no fields": `{}`, or `null` for a unit body.
                let unit = body == Value::Object(Map::new()) && validator.is_valid(&Value::Null);
                if !unit {
                    let at = e.instance_path().to_string();
                    let place = if at.is_empty() { "the body".to_owned() } else { at };
                    return Err(HttpError::MalformedBody(format!("{place}: {}", clip(&e.to_string()))));
                }
                body = Value::Null;
            }
            // JSON Schema counts 2.0 as an integer; serde does not.
            integral_floats(&mut body, 0);
        }
        (self.decode)(id, body)
    }

    /// Types the string values of a form body where the body type wants a
    /// number, a bool or null there (`curl -d budget=5` sends `"5"`).
    pub(crate) fn coerce_form(&self, fields: Map<String, Value>) -> Value {
        let coerced = fields
            .into_iter()
            .map(|(name, value)| {
                let value = match (&value, self.coercions.get(&name)) {
                    (Value::String(s), Some(scalars)) => scalars.coerce(s).unwrap_or(value),
                    _ => value,
                };
                (name, value)
            })
            .collect();
        Value::Object(coerced)
    }
}

/// At most 200 characters of `text`, for error details.
fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

/// Writes every number that is a whole float (`2.0`) as an integer, which
/// integer fields need and float fields take as well.
fn integral_floats(value: &mut Value, depth: u32) {
    if depth > 128 {
        return;
    }
    match value {
        Value::Number(n) if n.is_f64() => {
            // Within ±2^53 a whole float is exactly the integer it was
            // written as; beyond, it may be the rounding of another one
            // (JSON's -9223372036854775809 parses as i64::MIN's float), so
            // it stays a float and an integer field refuses it.
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0) {
                *value = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| integral_floats(v, depth + 1)),
        Value::Object(map) => map.values_mut().for_each(|v| integral_floats(v, depth + 1)),
        _ => {}
    }
}

/// An empty body means "no fields": `{}` for structs, `null` for `()`.
fn decode_body<B: DeserializeOwned>(value: Value) -> Result<B, HttpError> {
    let empty = value == Value::Object(Map::new());
    serde_json::from_value::<B>(value).or_else(|first| {
        empty
            .then(|| serde_json::from_value::<B>(Value::Null).ok())
            .flatten()
            .ok_or_else(|| HttpError::MalformedBody(first.to_string()))
    })
}

/// Which JSON scalar types a top-level field accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Scalars {
    string: bool,
    /// A string with a `format` (a date, say): never the word `null`.
    formatted: bool,
    integer: bool,
    number: bool,
    boolean: bool,
    null: bool,
    array: bool,
}

impl Scalars {
    fn coerce(&self, text: &str) -> Option<Value> {
        // A form spells JSON's null as nothing, or as the word itself
        // where no free text is wanted.
        let free_text = self.string && !self.formatted;
        if self.null && (text.is_empty() || text == "null") && !free_text {
            return Some(Value::Null);
        }
        if self.string {
            return None;
        }
        // One value of a list field is a list of one (`tag=a`); an empty
        // one is the empty list. Repeated keys already made a list.
        if self.array {
            return Some(if text.is_empty() { Value::Array(Vec::new()) } else { Value::Array(vec![text.into()]) });
        }
        if self.integer {
            if let Ok(i) = text.trim().parse::<i64>() {
                return Some(i.into());
            }
            if let Ok(u) = text.trim().parse::<u64>() {
                return Some(u.into());
            }
        }
        if self.number
            && let Some(n) = text.trim().parse::<f64>().ok().and_then(serde_json::Number::from_f64)
        {
            return Some(Value::Number(n));
        }
        if self.boolean {
            match text.trim() {
                "true" | "on" => return Some(true.into()),
                "false" | "off" => return Some(false.into()),
                _ => {}
            }
        }
        None
    }

    fn add_types(&mut self, schema: &Value, root: &Value, depth: u8) {
        if depth > 8 {
            return;
        }
        let mut add = |t: &str| match t {
            "string" => self.string = true,
            "integer" => self.integer = true,
            "number" => self.number = true,
            "boolean" => self.boolean = true,
            "null" => self.null = true,
            "array" => self.array = true,
            _ => {}
        };
        match schema.get("type") {
            Some(Value::String(t)) => add(t),
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).for_each(add),
            _ => {}
        }
        if schema.get("format").is_some() {
            self.formatted = true;
        }
        for key in ["anyOf", "oneOf"] {
            for sub in schema.get(key).and_then(Value::as_array).into_iter().flatten() {
                self.add_types(sub, root, depth + 1);
            }
        }
        if let Some(target) = schema.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix('#'))
            && let Some(sub) = root.pointer(target)
        {
            self.add_types(sub, root, depth + 1);
        }
        // An enum of strings is text.
        if schema.get("enum").and_then(Value::as_array).is_some_and(|e| e.iter().any(Value::is_string)) {
            self.string = true;
        }
    }
}

fn scalar_fields(root: &Value) -> BTreeMap<String, Scalars> {
    let mut out = BTreeMap::new();
    let Some(props) = root.get("properties").and_then(Value::as_object) else { return out };
    for (name, schema) in props {
        let mut s = Scalars::default();
        s.add_types(schema, root, 0);
        if s != Scalars::default() {
            out.insert(name.clone(), s);
        }
    }
    out
}

/// How the id of an aggregate created by `POST /{plural}` is made.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum IdStrategy {
    /// A random UUID (version 4).
    UuidV4,
    /// A time-ordered UUID (version 7): new rows land at the end of
    /// B-tree indexes, which keeps inserts cheap. The default.
    #[default]
    UuidV7,
    /// Ids made by the application.
    Custom(Arc<dyn Fn() -> String + Send + Sync>),
}

impl IdStrategy {
    pub(crate) fn next(&self) -> String {
        match self {
            Self::UuidV4 => uuid::Uuid::new_v4().to_string(),
            Self::UuidV7 => uuid::Uuid::now_v7().to_string(),
            Self::Custom(f) => f(),
        }
    }
}

impl fmt::Debug for IdStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UuidV4 => f.write_str("UuidV4"),
            Self::UuidV7 => f.write_str("UuidV7"),
            Self::Custom(_) => f.write_str("Custom"),
        }
    }
}

/// An id derived from an idempotency key, so that a retried create lands on
/// the aggregate the first attempt created (and the bus replays its answer).
///
/// The key is scoped by route and principal, so two clients choosing the
/// same key do not meet. Two 64-bit FNV-1a hashes with different offsets
/// make the 128 bits of a version-8 UUID.
pub(crate) fn id_for_key(plural: &str, principal: Option<&str>, key: &str) -> String {
    fn fnv(seed: u64, parts: &[&str]) -> u64 {
        let mut h = seed;
        for part in parts {
            for b in part.bytes().chain([0xff]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }
    let parts = [plural, principal.unwrap_or(""), key];
    let hi = fnv(0xcbf2_9ce4_8422_2325, &parts);
    let lo = fnv(0x6c62_272e_07bb_0142, &parts);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&hi.to_be_bytes());
    bytes[8..].copy_from_slice(&lo.to_be_bytes());
    uuid::Builder::from_custom_bytes(bytes).into_uuid().to_string()
}

/// How HTTP maps onto aggregate `A`: the plural route name and the
/// operations it offers.
///
/// Every operation is optional; a route whose operation is missing answers
/// 405. Bodies are typed: each `B` is deserialised from JSON (or a flat
/// form) and described in the OpenAPI document by its JSON Schema.
///
/// ```
/// # use kes_http::doc_fixtures::{Task, TaskCommand};
/// # use serde::Deserialize;
/// use kes_http::{IdStrategy, Resource};
///
/// #[derive(Deserialize, schemars::JsonSchema)]
/// struct OpenTask { #[serde(default)] title: String }
///
/// #[derive(Deserialize, schemars::JsonSchema)]
/// struct Finish {}
///
/// let tasks = Resource::<Task>::new("tasks")
///     .create(|b: OpenTask| TaskCommand::Open(b.title))
///     .command("finish", |_: Finish| TaskCommand::Finish)
///     .ids(IdStrategy::UuidV4);
/// assert_eq!(tasks.plural(), "tasks");
/// ```
pub struct Resource<A: Aggregate> {
    pub(crate) plural: String,
    pub(crate) ids: IdStrategy,
    pub(crate) create: Option<Operation<A::Command>>,
    pub(crate) replace: Option<Operation<A::Command>>,
    pub(crate) patch: Option<Operation<A::Command>>,
    pub(crate) delete: Option<Operation<A::Command>>,
    pub(crate) commands: BTreeMap<String, Operation<A::Command>>,
    pub(crate) rules: Rules<A, A::Command>,
}

impl<A: Aggregate> Clone for Resource<A> {
    fn clone(&self) -> Self {
        Self {
            plural: self.plural.clone(),
            ids: self.ids.clone(),
            create: self.create.clone(),
            replace: self.replace.clone(),
            patch: self.patch.clone(),
            delete: self.delete.clone(),
            commands: self.commands.clone(),
            rules: self.rules.clone(),
        }
    }
}

impl<A: Aggregate> fmt::Debug for Resource<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resource")
            .field("aggregate", &A::NAME)
            .field("plural", &self.plural)
            .field("ids", &self.ids)
            .field("create", &self.create.is_some())
            .field("replace", &self.replace.is_some())
            .field("patch", &self.patch.is_some())
            .field("delete", &self.delete.is_some())
            .field("commands", &self.commands.keys().collect::<Vec<_>>())
            .field("rules", &self.rules)
            .finish()
    }
}

impl<A: Aggregate> Resource<A> {
    /// Aggregate `A` under `/{plural}` (`"projects"`), with no operation yet.
    pub fn new(plural: impl Into<String>) -> Self {
        Self {
            plural: plural.into(),
            ids: IdStrategy::default(),
            create: None,
            replace: None,
            patch: None,
            delete: None,
            commands: BTreeMap::new(),
            rules: Rules::default(),
        }
    }

    /// The route name.
    pub fn plural(&self) -> &str {
        &self.plural
    }

    /// How ids of created aggregates are made (default [`IdStrategy::UuidV7`]).
    pub fn ids(mut self, ids: IdStrategy) -> Self {
        self.ids = ids;
        self
    }

    /// `POST /{plural}`: body `B` becomes the create command. An empty body
    /// is read as `{}`, so a body type whose fields all have defaults
    /// creates with no body at all.
    pub fn create<B>(self, f: impl Fn(B) -> A::Command + Send + Sync + 'static) -> Self
    where
        B: DeserializeOwned + JsonSchema + 'static,
    {
        self.create_with_id(move |_, b| f(b))
    }

    /// Like [`Resource::create`], for aggregates whose create command needs
    /// the new id.
    pub fn create_with_id<B>(mut self, f: impl Fn(&str, B) -> A::Command + Send + Sync + 'static) -> Self
    where
        B: DeserializeOwned + JsonSchema + 'static,
    {
        self.create = Some(Operation::with_body(f));
        self
    }

    /// `PUT /{plural}/{id}`: body `B` becomes the replace command.
    pub fn replace<B>(mut self, f: impl Fn(B) -> A::Command + Send + Sync + 'static) -> Self
    where
        B: DeserializeOwned + JsonSchema + 'static,
    {
        self.replace = Some(Operation::with_body(move |_, b| f(b)));
        self
    }

    /// `PATCH /{plural}/{id}`: body `B` (usually all fields optional)
    /// becomes the update command.
    pub fn patch<B>(mut self, f: impl Fn(B) -> A::Command + Send + Sync + 'static) -> Self
    where
        B: DeserializeOwned + JsonSchema + 'static,
    {
        self.patch = Some(Operation::with_body(move |_, b| f(b)));
        self
    }

    /// `DELETE /{plural}/{id}`: the command that deletes (the aggregate's
    /// [`Aggregate::is_deleted`] must become true for reads to answer 404).
    pub fn delete(mut self, f: impl Fn() -> A::Command + Send + Sync + 'static) -> Self {
        self.delete = Some(Operation::without_body(move |_| f()));
        self
    }

    /// `POST /{plural}/{id}/{name}`: a named domain command (`archive`,
    /// `assign`, …) whose body `B` becomes the command. Names are lower-case
    /// ASCII letters, digits, `-` and `_`; `events` is taken by the audit
    /// history. A second registration of a name replaces the first.
    pub fn command<B>(mut self, name: impl Into<String>, f: impl Fn(B) -> A::Command + Send + Sync + 'static) -> Self
    where
        B: DeserializeOwned + JsonSchema + 'static,
    {
        self.commands.insert(name.into(), Operation::with_body(move |_, b| f(b)));
        self
    }

    /// Lets only callers for whom `allowed(principal, state)` holds run
    /// `operation` (`create`, `replace`, `patch`, `delete` or a named
    /// command); others get `403` with `rule` as the reason, before the
    /// aggregate's `handle` runs. `state` is the aggregate as the command
    /// would be decided on (the default state for `create`). `rule` says
    /// in words who may (it is shown to refused callers and in the OpenAPI
    /// document). Rules apply when the API has identities (see
    /// [`crate::access`]). A second rule on an operation replaces the first.
    ///
    /// ```
    /// # use kes_http::doc_fixtures::{Task, TaskCommand};
    /// # #[derive(serde::Deserialize, schemars::JsonSchema)] struct NoBody {}
    /// let tasks = kes_http::Resource::<Task>::new("tasks")
    ///     .command("archive", |_: NoBody| TaskCommand::Archive)
    ///     .allow("archive", "only the owner or an admin", |who, task| {
    ///         who.subject == task.owner || who.has_role("admin")
    ///     });
    /// ```
    pub fn allow(
        self,
        operation: impl Into<String>,
        rule: impl Into<String>,
        allowed: impl Fn(&Principal, &A) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.allow_command(operation, rule, move |who, state, _| allowed(who, state))
    }

    /// Like [`Resource::allow`], with the command in view too: a rule on
    /// what the command would change (only the owner may give a project
    /// another owner), decided on the state it would change.
    pub fn allow_command(
        mut self,
        operation: impl Into<String>,
        rule: impl Into<String>,
        allowed: impl Fn(&Principal, &A, &A::Command) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.rules.add_write(operation.into(), rule.into(), allowed);
        self
    }

    /// Lets only callers for whom `allowed(principal)` holds read the
    /// resource (one aggregate, the list, the history and the change
    /// feeds); others get `403` with `rule` as the reason.
    pub fn allow_reads(
        mut self,
        rule: impl Into<String>,
        allowed: impl Fn(&Principal) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.rules.set_reads(rule.into(), allowed);
        self
    }

    /// Whether this resource offers `operation`.
    fn offers(&self, operation: &str) -> bool {
        match operation {
            "create" => self.create.is_some(),
            "replace" => self.replace.is_some(),
            "patch" => self.patch.is_some(),
            "delete" => self.delete.is_some(),
            name => self.commands.contains_key(name),
        }
    }

    /// Checks names before anything is routed.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(op) = self.rules.writes.keys().find(|op| !self.offers(op)) {
            return Err(ConfigError(format!(
                "/{} has a rule for {op:?}, which it does not offer (create, replace, patch, delete or a command)",
                self.plural
            )));
        }
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.starts_with(|c: char| c.is_ascii_lowercase())
                && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        };
        if !plain(&self.plural) {
            return Err(ConfigError(format!(
                "route name {:?} must be lower-case ASCII letters, digits, - and _",
                self.plural
            )));
        }
        if ["openapi.json", "health", "metrics"].contains(&self.plural.as_str()) {
            return Err(ConfigError(format!("route name {:?} is reserved", self.plural)));
        }
        for name in self.commands.keys() {
            if !plain(name) {
                return Err(ConfigError(format!(
                    "command name {name:?} must be lower-case ASCII letters, digits, - and _"
                )));
            }
            if name == "events" {
                return Err(ConfigError("command name \"events\" is taken by the audit history".into()));
            }
            if ["create", "replace", "patch", "delete"].contains(&name.as_str()) {
                return Err(ConfigError(format!(
                    "command name {name:?} would share its rules with the {name} operation"
                )));
            }
            if name == crate::id::RESERVED_ID {
                return Err(ConfigError("command name \"changes\" is taken by the change feed".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Debug, Deserialize, JsonSchema, PartialEq)]
    struct Body {
        name: String,
        budget: Option<i64>,
        rate: f64,
        active: bool,
        code: String,
    }

    #[test]
    fn form_strings_become_numbers_only_where_the_body_wants_numbers() {
        let op = Operation::<Body>::with_body(|_, b: Body| b);
        let mut form = Map::new();
        for (k, v) in [("name", "42"), ("budget", "7"), ("rate", "1.5"), ("active", "true"), ("code", "007")] {
            form.insert(k.into(), v.into());
        }
        let body = op.command("x", op.coerce_form(form)).unwrap();
        assert_eq!(body, Body { name: "42".into(), budget: Some(7), rate: 1.5, active: true, code: "007".into() });
        let mut nulls = Map::new();
        for (k, v) in [("name", "null"), ("budget", "null"), ("rate", "0"), ("active", "off"), ("code", "")] {
            nulls.insert(k.into(), v.into());
        }
        let body = op.command("x", op.coerce_form(nulls)).unwrap();
        assert_eq!((body.name.as_str(), body.budget), ("null", None), "null is a word where text is wanted");
        let mut bad = Map::new();
        bad.insert("budget".into(), "lots".into());
        assert!(matches!(op.command("x", op.coerce_form(bad)), Err(HttpError::MalformedBody(_))));
    }

    #[test]
    fn the_word_null_is_null_where_no_free_text_is_wanted() {
        #[derive(Debug, Deserialize, JsonSchema)]
        struct Dated {
            due: Option<chrono::NaiveDate>,
            note: Option<String>,
        }
        let op = Operation::<(Option<chrono::NaiveDate>, Option<String>)>::with_body(|_, b: Dated| (b.due, b.note));
        let form = Map::from_iter([("due".to_owned(), Value::from("null")), ("note".to_owned(), Value::from("null"))]);
        assert_eq!(op.command("x", op.coerce_form(form)).unwrap(), (None, Some("null".to_owned())));
    }

    #[test]
    fn a_form_value_of_a_list_field_is_a_list() {
        #[derive(Debug, Deserialize, JsonSchema)]
        struct Tagged {
            tags: Vec<String>,
        }
        let op = Operation::<Vec<String>>::with_body(|_, b: Tagged| b.tags);
        let form = |v: &str| Map::from_iter([("tags".to_owned(), Value::from(v))]);
        assert_eq!(op.command("x", op.coerce_form(form("a"))).unwrap(), ["a"]);
        assert!(op.command("x", op.coerce_form(form(""))).unwrap().is_empty());
    }

    #[test]
    fn an_empty_body_reads_as_no_fields() {
        let unit = Operation::<()>::with_body(|_, (): ()| ());
        assert!(unit.command("x", json!({})).is_ok());
        #[derive(Deserialize, JsonSchema)]
        struct Named {
            #[serde(default)]
            _name: String,
        }
        let named = Operation::<()>::with_body(|_, _: Named| ());
        assert!(named.command("x", json!({})).is_ok());
    }

    #[test]
    fn key_derived_ids_are_stable_and_scoped() {
        let a = id_for_key("projects", Some("ann"), "k1");
        assert_eq!(a, id_for_key("projects", Some("ann"), "k1"));
        assert_ne!(a, id_for_key("projects", Some("bob"), "k1"));
        assert_ne!(a, id_for_key("tasks", Some("ann"), "k1"));
        assert_ne!(a, id_for_key("projects", Some("ann"), "k2"));
        assert!(uuid::Uuid::parse_str(&a).is_ok());
    }
}
