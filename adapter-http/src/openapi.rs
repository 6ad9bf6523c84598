//! The OpenAPI 3.1 document of every mounted aggregate.
//!
//! Bodies and states are described by their schemars (JSON Schema 2020-12,
//! the dialect OpenAPI 3.1 uses) schemas, stored under
//! `components/schemas`; list rows are described from the view's
//! [`ViewSchema`], so filters, sorts and page sizes are typed parameters a
//! client generator or fuzzer can use.

use std::sync::Arc;

use kes_core::{Aggregate, FieldType, FilterOp, ViewSchema};
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Map, Value, json};

use crate::access::Rules;
use crate::api::{HttpConfig, Mount};
use crate::ops::MountedDescription;
use crate::resource::Operation;

/// Adds one mount's paths and schemas to the document.
pub(crate) trait Describe {
    fn describe(&self, g: &mut SchemaGenerator, paths: &mut Map<String, Value>, schemas: &mut Map<String, Value>);
}

fn r(kind: &str, name: &str) -> Value {
    json!({ "$ref": format!("#/components/{kind}/{name}") })
}

fn field_schema(ty: FieldType) -> Value {
    match ty {
        FieldType::Text | FieldType::Keyword => json!({ "type": "string" }),
        FieldType::Integer => json!({ "type": "integer", "format": "int64" }),
        FieldType::Float => json!({ "type": "number", "format": "double" }),
        FieldType::Bool => json!({ "type": "boolean" }),
        FieldType::Timestamp => json!({ "type": "string", "format": "date-time" }),
    }
}

fn op_id(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

/// The OpenAPI document of `mounts`; with `bearer`, every operation of the
/// mounted resources requires a bearer JWT (and may answer 401).
pub(crate) fn document(config: &HttpConfig, mounts: &[Arc<dyn Mount>], bearer: bool) -> Value {
    let mut g = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for m in mounts {
        m.describe(&mut g, &mut paths, &mut schemas);
    }
    for (name, schema) in g.take_definitions(true) {
        schemas.insert(name, schema);
    }
    shared_schemas(&mut schemas);
    if bearer {
        require_bearer(&mut paths);
    }
    add_service_paths(&mut paths, bearer);
    let mut components = json!({
        "schemas": schemas,
        "parameters": parameters(),
        "headers": headers(),
        "responses": responses(),
    });
    let mut security = Value::Null;
    if bearer {
        components["securitySchemes"] = json!({
            "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                        "description": "A JWT whose subject becomes the principal recorded with every event." }
        });
        let mut unauthorized =
            problem("No bearer token, or one that does not verify (signature, expiry, issuer, audience).");
        unauthorized["headers"] = json!({ "WWW-Authenticate": { "schema": { "type": "string" } } });
        components["responses"]["kes.Unauthorized"] = unauthorized;
        security = json!([{ "bearer": [] }]);
    }
    let mut document = json!({
        "openapi": "3.1.0",
        "info": {
            "title": config.title,
            "version": config.version,
            "description": "Event-sourced aggregates over REST. Writes answer with the new version (ETag) and a \
                log position token (KES-Position); send the token back on a list read to wait until the views \
                reflect the write."
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": paths,
        "components": components,
    });
    if !security.is_null() {
        document["security"] = security;
    }
    bound_integers(&mut document, 0);
    document
}

/// The schemas every mount's paths refer to.
// Kept in one piece: it is data, one literal per schema.
fn shared_schemas(schemas: &mut Map<String, Value>) {
    schemas.insert(
        "kes.Problem".into(),
        json!({
            "type": "object",
            "description": "An RFC 9457 problem document.",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": { "type": "string", "description": "Stable URI of the kind of problem (urn:kes:problem:…)." },
                "title": { "type": "string" },
                "status": { "type": "integer", "minimum": 400, "maximum": 599 },
                "detail": { "type": "string" }
            }
        }),
    );
    schemas.insert(
        "kes.Metadata".into(),
        json!({
            "type": "object",
            "properties": {
                "correlation_id": { "type": "string" },
                "causation_id": { "type": "string" },
                "principal": { "type": "string" },
                "idempotency_key": {
                    "type": "string",
                    "description": "The write's Idempotency-Key as stored: `sha256:` and the unpadded base64url SHA-256 of the key as sent (for an identified caller, of the key, `·` and the caller's subject); never the key itself"
                },
                "extra": { "type": "object", "additionalProperties": { "type": "string" } }
            }
        }),
    );
    schemas.insert(
        "kes.EventRecord".into(),
        json!({
            "type": "object",
            "required": ["event_id", "version", "type", "revision", "recorded_at", "position", "metadata", "payload"],
            "properties": {
                "event_id": { "type": "string", "format": "uuid" },
                "version": { "type": "integer", "minimum": 1 },
                "type": { "type": "string" },
                "revision": { "type": "integer", "minimum": 1 },
                "recorded_at": { "type": "string", "format": "date-time" },
                "position": { "type": "string", "pattern": "^[0-9]+:[0-9]+$" },
                "metadata": r("schemas", "kes.Metadata"),
                "payload": { "description": "The event as the aggregate recorded it." }
            }
        }),
    );
    schemas.insert(
        "kes.History".into(),
        json!({
            "type": "object",
            "required": ["id", "items", "next"],
            "properties": {
                "id": { "type": "string" },
                "items": { "type": "array", "items": r("schemas", "kes.EventRecord") },
                "next": { "type": ["integer", "null"], "minimum": 1,
                          "description": "The version to send as page[after] for the next page; null on the last page." }
            }
        }),
    );
    schemas.insert(
        "kes.Health".into(),
        json!({
            "type": "object",
            "required": ["status", "checks"],
            "properties": {
                "status": { "enum": ["ok", "unavailable"] },
                "checks": { "type": "object", "additionalProperties": { "enum": ["up", "down"] } }
            }
        }),
    );
}

/// Every mounted operation may answer 401; feeds also take the token as a
/// query parameter.
fn require_bearer(paths: &mut Map<String, Value>) {
    for (path, item) in paths.iter_mut() {
        if path.ends_with("/changes")
            && let Some(params) = item.pointer_mut("/get/parameters").and_then(Value::as_array_mut)
        {
            params.push(json!({ "name": "access_token", "in": "query", "required": false,
                "description": "The bearer token, for clients that cannot send Authorization (a browser's \
                    EventSource); used only when no Authorization header is sent.",
                "schema": { "type": "string", "maxLength": 8192 } }));
        }
    }
    for item in paths.values_mut() {
        for operation in item.as_object_mut().into_iter().flat_map(|o| o.values_mut()) {
            if let Some(responses) = operation.get_mut("responses").and_then(Value::as_object_mut) {
                responses.insert("401".into(), r("responses", "kes.Unauthorized"));
            }
        }
    }
}

/// Gives every integer schema with a size `format` (`int64`, `uint32`, …,
/// as schemars writes them) the `minimum` and `maximum` of that size, which
/// the body decoder enforces: a generator reading the document then never
/// makes a number the server cannot hold.
pub(crate) fn bound_integers(value: &mut Value, depth: u32) {
    if depth > 64 {
        return;
    }
    match value {
        Value::Object(map) => {
            let range = match map.get("format").and_then(Value::as_str) {
                Some("int8") => Some((i128::from(i8::MIN), i128::from(i8::MAX))),
                Some("int16") => Some((i128::from(i16::MIN), i128::from(i16::MAX))),
                Some("int32") => Some((i128::from(i32::MIN), i128::from(i32::MAX))),
                Some("int64") => Some((i128::from(i64::MIN), i128::from(i64::MAX))),
                Some("uint8") => Some((0, i128::from(u8::MAX))),
                Some("uint16") => Some((0, i128::from(u16::MAX))),
                Some("uint32") => Some((0, i128::from(u32::MAX))),
                Some("uint64" | "uint") => Some((0, i128::from(u64::MAX))),
                _ => None,
            };
            if let Some((min, max)) = range {
                let number = |n: i128| {
                    i64::try_from(n)
                        .map(Value::from)
                        .unwrap_or_else(|_| u64::try_from(n).map(Value::from).unwrap_or(Value::Null))
                };
                map.entry("minimum").or_insert_with(|| number(min));
                map.entry("maximum").or_insert_with(|| number(max));
            }
            for v in map.values_mut() {
                bound_integers(v, depth + 1);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| bound_integers(v, depth + 1)),
        _ => {}
    }
}

/// `/health`, `/metrics` and `/openapi.json`, open to all (`bearer`: the
/// document requires a token elsewhere, so they say they need none).
fn add_service_paths(paths: &mut Map<String, Value>, bearer: bool) {
    paths.insert(
        "/health".into(),
        json!({ "get": {
            "operationId": "health",
            "summary": "Readiness: every store and list view answers.",
            "tags": ["service"],
            "responses": {
                "200": { "description": "Ready.", "content": { "application/json": { "schema": r("schemas", "kes.Health") } } },
                "503": { "description": "A backend is down.", "headers": { "Retry-After": r("headers", "Retry-After") },
                         "content": { "application/json": { "schema": r("schemas", "kes.Health") } } }
            }
        }}),
    );
    paths.insert(
        "/metrics".into(),
        json!({ "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics: commands, latencies, projection lag.",
            "tags": ["service"],
            "responses": { "200": { "description": "Prometheus text format.", "content": { "text/plain": { "schema": { "type": "string" } } } } }
        }}),
    );
    paths.insert(
        "/openapi.json".into(),
        json!({ "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "tags": ["service"],
            "responses": { "200": { "description": "OpenAPI 3.1.", "content": { "application/json": { "schema": { "type": "object" } } } } }
        }}),
    );
    if bearer {
        for path in ["/health", "/metrics", "/openapi.json"] {
            if let Some(get) = paths.get_mut(path).and_then(|item| item.get_mut("get")) {
                get["security"] = json!([]);
            }
        }
    }
}

fn parameters() -> Value {
    json!({
        "kes.Id": { "name": "id", "in": "path", "required": true,
                    "description": "The aggregate id: 1 to 255 characters, no / and no control character, not starting with a dot. No aggregate has the id `changes`: `/{plural}/changes` is the list's change feed, a concrete path that is matched before this template.",
                    "schema": { "type": "string", "minLength": 1, "maxLength": crate::id::MAX_ID_CHARS,
                                "pattern": crate::id::ID_PATTERN } },
        "kes.IfMatch": { "name": "If-Match", "in": "header", "required": false,
                         "description": "The version the write expects (an ETag such as \"3\", or *). 412 when stale.",
                         "schema": { "type": "string", "pattern": "^(\\*|[1-9][0-9]{0,18}|\"[1-9][0-9]{0,18}\")$" } },
        "kes.IfNoneMatch": { "name": "If-None-Match", "in": "header", "required": false,
                             "description": "ETags the client holds; 304 when the version is among them.",
                             "schema": { "type": "string", "pattern": "^[\\t -~]*$" } },
        "kes.IdempotencyKey": { "name": "Idempotency-Key", "in": "header", "required": false,
                                "description": "Retry key: the same key on the same aggregate appends once and replays the first answer.",
                                "schema": { "type": "string", "minLength": 1, "maxLength": 255,
                                            "pattern": "^[!-~]([ -~]*[!-~])?$" } },
        "kes.Position": { "name": "KES-Position", "in": "header", "required": false,
                          "description": "A position token from a write (LOG@PARTITION:OFFSET); a read of the same aggregate type waits (bounded) until the views (lists, history) or this instance's table (reads by id) reached it. A token of another aggregate type's log is not waited for (KES-Consistency: eventual); an empty one is no token.",
                          "schema": { "type": "string", "pattern": "^(([A-Za-z0-9_.-]{1,64}@)?[0-9]{1,9}:[0-9]{1,19})?$" } },
    })
}

fn headers() -> Value {
    json!({
        "ETag": { "description": "The aggregate's version, quoted.", "schema": { "type": "string" } },
        "Location": { "description": "The created aggregate.", "schema": { "type": "string" } },
        "KES-Position": { "description": "Where the write sits in its aggregate type's log (LOG@PARTITION:OFFSET).", "schema": { "type": "string" } },
        "KES-Consistency": { "description": "eventual, caught-up or stale.", "schema": { "enum": ["eventual", "caught-up", "stale"] } },
        "Idempotent-Replayed": { "description": "true when the answer repeats a first one with the same Idempotency-Key.", "schema": { "type": "string" } },
        "Retry-After": { "description": "Seconds to wait before retrying.", "schema": { "type": "integer" } },
    })
}

fn problem(description: &str) -> Value {
    json!({ "description": description, "content": { "application/problem+json": { "schema": r("schemas", "kes.Problem") } } })
}

fn responses() -> Value {
    let mut unavailable = problem("A store or view is unavailable, or the request timed out; retry later.");
    unavailable["headers"] = json!({ "Retry-After": r("headers", "Retry-After") });
    let mut stale = problem("The If-Match version is stale; nothing was appended. ETag names the current version.");
    stale["headers"] = json!({ "ETag": r("headers", "ETag") });
    json!({
        "kes.BadRequest": problem("Malformed body, query, cursor, search or header."),
        "kes.NotFound": problem("No such aggregate (or it was deleted)."),
        "kes.Conflict": problem("The aggregate changed meanwhile, or already exists."),
        "kes.PreconditionFailed": stale,
        "kes.PayloadTooLarge": problem("The body exceeds the limit."),
        "kes.UnsupportedMediaType": problem("The body is neither JSON nor form data."),
        "kes.Rejected": problem("The aggregate refused the command (a business rule)."),
        "kes.InvalidCursor": problem("page[after] is not a cursor this list issued for this sort and these filters (problem type urn:kes:problem:invalid-cursor)."),
        "kes.Unavailable": unavailable,
        "kes.Internal": problem("The server failed; details are in its log."),
    })
}

/// Adds the `403` of an operation guarded by `rule` (none without one).
fn forbidden(responses: &mut Map<String, Value>, rule: Option<&str>) {
    if let Some(rule) = rule {
        responses.insert(
            "403".into(),
            problem(&format!(
                "The caller may not: {rule}. Nothing was changed (problem type urn:kes:problem:forbidden)."
            )),
        );
    }
}

fn refs(codes: &[&str]) -> Map<String, Value> {
    codes
        .iter()
        .map(|code| {
            let name = match *code {
                "400" => "kes.BadRequest",
                "404" => "kes.NotFound",
                "409" => "kes.Conflict",
                "412" => "kes.PreconditionFailed",
                "413" => "kes.PayloadTooLarge",
                "415" => "kes.UnsupportedMediaType",
                "422" => "kes.Rejected",
                "503" => "kes.Unavailable",
                _ => "kes.Internal",
            };
            ((*code).to_owned(), r("responses", name))
        })
        .collect()
}

/// The request body of `op`. It is required when the body type has
/// required fields: an empty body reads as `{}`, which then fails.
fn request_body<C>(g: &mut SchemaGenerator, op: &Operation<C>) -> Option<Value> {
    let schema = (op.schema.as_ref()?)(g).to_value();
    let resolved = match schema.get("$ref").and_then(Value::as_str).and_then(|r| r.rsplit_once('/')) {
        Some((_, name)) => g.definitions().get(name).cloned().unwrap_or(Value::Null),
        None => schema.clone(),
    };
    let required = resolved.get("required").and_then(Value::as_array).is_some_and(|r| !r.is_empty());
    let form = form_schema(&resolved).unwrap_or_else(|| schema.clone());
    let mut body = json!({
        "required": required,
        "content": {
            "application/json": { "schema": schema },
            "application/x-www-form-urlencoded": { "schema": form }
        }
    });
    if let Some(d) = &op.description {
        body["description"] = d.clone().into();
    }
    Some(body)
}

/// The schema of a body sent as a form, where the server reads what a
/// form cannot say: one value of a list field is a list of one (`tags=a`),
/// an empty value of a field that takes null, other than free text, is
/// null (`due=`), and a free text field takes only text (`x=null` is the
/// text "null", which its pattern may refuse). `None` when no field needs
/// any of these.
fn form_schema(body: &Value) -> Option<Value> {
    let mut form = body.clone();
    let properties = form.get_mut("properties")?.as_object_mut()?;
    let mut changed = false;
    for property in properties.values_mut() {
        let types: Vec<&str> = match property.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let free_text = types.contains(&"string") && property.get("format").is_none();
        let mut choices = Vec::new();
        if types.contains(&"array")
            && let Some(item) = property.get("items")
        {
            choices.push(item.clone());
        }
        if types.contains(&"null") && !free_text {
            choices.push(json!({ "type": "string", "maxLength": 0 }));
        } else if types.contains(&"null") && free_text {
            // A form value is always text: `x=null` is the string "null",
            // so a form cannot give a free text field no value.
            property["type"] = json!("string");
            changed = true;
        }
        if !choices.is_empty() {
            choices.insert(0, property.take());
            *property = json!({ "anyOf": choices });
            changed = true;
        }
    }
    changed.then_some(form)
}

fn list_parameters(schema: &ViewSchema) -> Vec<Value> {
    let mut params = Vec::new();
    let mut sortable = vec!["id".to_owned()];
    for f in &schema.fields {
        if f.sortable {
            sortable.push(f.name.clone());
        }
    }
    let keys = sortable.join("|");
    params.push(json!({ "name": "sort", "in": "query", "required": false,
        "description": "Sort keys, most significant first; - for descending.",
        "schema": { "type": "string", "pattern": format!("^(-?({keys})(,-?({keys}))*)?$") } }));
    params.push(json!({ "name": "page[size]", "in": "query", "required": false,
        "schema": { "type": "integer", "minimum": 1, "maximum": schema.max_page_size } }));
    params.push(json!({ "name": "page[after]", "in": "query", "required": false,
        "description": "The next cursor of the previous page (422 for any other string; empty: the first page).",
        "schema": { "type": "string" } }));
    if schema.fields.iter().any(|f| f.searchable) {
        params.push(json!({ "name": "q", "in": "query", "required": false,
            "description": "Full-text search over the searchable fields (no control characters).",
            "schema": { "type": "string", "maxLength": 256, "pattern": "^[^\u{0}-\u{1f}\u{7f}-\u{9f}]*$" } }));
    }
    let mut filterable: Vec<(String, FieldType)> = vec![("id".into(), FieldType::Keyword)];
    filterable.extend(schema.fields.iter().filter(|f| f.filterable).map(|f| (f.name.clone(), f.ty)));
    for (name, ty) in filterable {
        params.push(
            json!({ "name": format!("filter[{name}]"), "in": "query", "required": false, "schema": field_schema(ty) }),
        );
        for op in FilterOp::ALL {
            let value = match op {
                FilterOp::Eq => continue,
                FilterOp::Prefix if !matches!(ty, FieldType::Text | FieldType::Keyword) => continue,
                FilterOp::In => {
                    // Comma-separated: a text value cannot hold a comma.
                    let mut item = field_schema(ty);
                    if matches!(ty, FieldType::Text | FieldType::Keyword) {
                        item["pattern"] = "^[^,]*$".into();
                    }
                    params.push(json!({ "name": format!("filter[{name}][in]"), "in": "query", "required": false,
                        "description": "Any of these values (comma-separated).",
                        "style": "form", "explode": false,
                        "schema": { "type": "array", "minItems": 1, "maxItems": 100, "items": item } }));
                    continue;
                }
                _ => field_schema(ty),
            };
            params.push(
                json!({ "name": format!("filter[{name}][{op}]"), "in": "query", "required": false, "schema": value }),
            );
        }
    }
    params.push(r("parameters", "kes.Position"));
    params
}

/// What the paths of one mounted resource share while they are described.
struct Cx<'a, A: Aggregate> {
    plural: &'a str,
    name: String,
    state: Value,
    tags: Value,
    rules: &'a Rules<A, A::Command>,
    write_params: Value,
}

/// The response of a successful write: the new state (none for 204) and
/// the headers every write sets.
fn written(state: &Value, status: &str, description: &str, with_location: bool) -> Value {
    let mut headers = json!({
        "ETag": r("headers", "ETag"),
        "KES-Position": r("headers", "KES-Position"),
        "Idempotent-Replayed": r("headers", "Idempotent-Replayed"),
    });
    if with_location {
        headers["Location"] = r("headers", "Location");
    }
    let mut resp = json!({ "description": description, "headers": headers });
    if status != "204" {
        resp["content"] = json!({ "application/json": { "schema": state.clone() } });
    }
    resp
}

impl<A: Aggregate + JsonSchema> Describe for MountedDescription<A> {
    fn describe(&self, g: &mut SchemaGenerator, paths: &mut Map<String, Value>, schemas: &mut Map<String, Value>) {
        let plural = self.resource.plural.as_str();
        let cx = Cx {
            plural,
            name: op_id(A::NAME),
            state: g.subschema_for::<A>().to_value(),
            tags: json!([plural]),
            rules: &self.resource.rules,
            write_params: json!([r("parameters", "kes.IfMatch"), r("parameters", "kes.IdempotencyKey")]),
        };
        self.row_schemas(&cx, schemas);
        paths.insert(format!("/{plural}"), self.collection_path(g, &cx));
        paths.insert(format!("/{plural}/{{id}}"), self.item_path(g, &cx));
        paths.insert(format!("/{plural}/{{id}}/events"), history_path::<A>(&cx));
        feed_paths(&cx, paths);
        self.command_paths(g, &cx, paths);
    }
}

impl<A: Aggregate + JsonSchema> MountedDescription<A> {
    /// `{plural}.Row`, `.ListItem` and `.Page`: the list's shapes, from the
    /// view's schema.
    fn row_schemas(&self, cx: &Cx<'_, A>, schemas: &mut Map<String, Value>) {
        let plural = cx.plural;
        let row_props: Map<String, Value> =
            self.schema.fields.iter().map(|f| (f.name.clone(), field_schema(f.ty))).collect();
        schemas.insert(format!("{plural}.Row"), json!({ "type": "object", "properties": row_props }));
        schemas.insert(
            format!("{plural}.ListItem"),
            json!({ "type": "object", "required": ["id", "version", "row"], "properties": {
                "id": { "type": "string" },
                "version": { "type": "integer", "minimum": 1 },
                "row": r("schemas", &format!("{plural}.Row"))
            }}),
        );
        schemas.insert(
            format!("{plural}.Page"),
            json!({ "type": "object", "required": ["items", "next", "total"], "properties": {
                "items": { "type": "array", "items": r("schemas", &format!("{plural}.ListItem")) },
                "next": { "type": ["string", "null"], "description": "Cursor of the next page; null on the last." },
                "total": { "type": "integer", "minimum": 0 }
            }}),
        );
    }

    /// `GET` (the list) and `POST` (create) on `/{plural}`.
    fn collection_path(&self, g: &mut SchemaGenerator, cx: &Cx<'_, A>) -> Value {
        let Cx { plural, name, state, tags, .. } = cx;
        let mut collection = Map::new();
        let rules = cx.rules;
        let mut list_responses = refs(&["400", "500", "503"]);
        list_responses.insert("422".into(), r("responses", "kes.InvalidCursor"));
        forbidden(&mut list_responses, rules.read_text());
        list_responses.insert(
            "200".into(),
            json!({ "description": "One page of the list.",
                    "headers": { "KES-Consistency": r("headers", "KES-Consistency") },
                    "content": { "application/json": { "schema": r("schemas", &format!("{plural}.Page")) } } }),
        );
        collection.insert(
            "get".into(),
            json!({ "operationId": format!("list_{}", op_id(plural)), "tags": tags, "summary": format!("List {plural}."),
                    "parameters": list_parameters(&self.schema), "responses": list_responses }),
        );
        if let Some(op) = &self.resource.create {
            let mut responses = refs(&["400", "409", "413", "415", "422", "500", "503"]);
            forbidden(&mut responses, rules.write_text("create"));
            responses.insert("201".into(), written(state, "201", &format!("The new {}.", A::NAME), true));
            let mut o = json!({ "operationId": format!("create_{name}"), "tags": tags,
                "summary": format!("Create a {}; the server makes its id.", A::NAME),
                "parameters": [r("parameters", "kes.IdempotencyKey")], "responses": responses });
            if let Some(body) = request_body(g, op) {
                o["requestBody"] = body;
            }
            collection.insert("post".into(), o);
        }
        Value::Object(collection)
    }

    /// `GET`, `PUT`, `PATCH` and `DELETE` on `/{plural}/{id}`.
    fn item_path(&self, g: &mut SchemaGenerator, cx: &Cx<'_, A>) -> Value {
        let Cx { name, state, tags, rules, write_params, .. } = cx;
        let mut item = Map::new();
        item.insert("parameters".into(), json!([r("parameters", "kes.Id")]));
        let mut get_responses = refs(&["400", "404", "500", "503"]);
        forbidden(&mut get_responses, rules.read_text());
        get_responses.insert(
            "200".into(),
            json!({ "description": format!("The {}'s latest state.", A::NAME),
                    "headers": { "ETag": r("headers", "ETag"), "KES-Consistency": r("headers", "KES-Consistency") },
                    "content": { "application/json": { "schema": state.clone() } } }),
        );
        get_responses.insert(
            "304".into(),
            json!({ "description": "Not modified since the If-None-Match version.", "headers": { "ETag": r("headers", "ETag") } }),
        );
        item.insert(
            "get".into(),
            json!({ "operationId": format!("get_{name}"), "tags": tags, "summary": format!("Read one {}.", A::NAME),
                    "parameters": [r("parameters", "kes.IfNoneMatch"), r("parameters", "kes.Position")],
                    "responses": get_responses }),
        );
        let updates = [("put", "replace", &self.resource.replace), ("patch", "patch", &self.resource.patch)];
        for (method, verb, op) in updates {
            let Some(op) = op else { continue };
            let mut responses = refs(&["400", "404", "409", "412", "413", "415", "422", "500", "503"]);
            forbidden(&mut responses, rules.write_text(verb));
            responses
                .insert("200".into(), written(state, "200", &format!("The {} after the command.", A::NAME), false));
            let mut o = json!({ "operationId": format!("{verb}_{name}"), "tags": tags,
                "summary": format!("{verb} a {}.", A::NAME), "parameters": write_params, "responses": responses });
            if let Some(body) = request_body(g, op) {
                o["requestBody"] = body;
            }
            item.insert(method.into(), o);
        }
        if self.resource.delete.is_some() {
            let mut responses = refs(&["400", "404", "409", "412", "422", "500", "503"]);
            forbidden(&mut responses, rules.write_text("delete"));
            responses.insert("204".into(), written(state, "204", "Deleted.", false));
            item.insert(
                "delete".into(),
                json!({ "operationId": format!("delete_{name}"), "tags": tags,
                        "summary": format!("Delete a {} (its history stays).", A::NAME),
                        "parameters": write_params, "responses": responses }),
            );
        }
        Value::Object(item)
    }

    /// `POST /{plural}/{id}/{command}` for every named command.
    fn command_paths(&self, g: &mut SchemaGenerator, cx: &Cx<'_, A>, paths: &mut Map<String, Value>) {
        let Cx { plural, name, state, tags, rules, write_params } = cx;
        for (command, op) in &self.resource.commands {
            let mut responses = refs(&["400", "404", "409", "412", "413", "415", "422", "500", "503"]);
            forbidden(&mut responses, rules.write_text(command));
            responses
                .insert("200".into(), written(state, "200", &format!("The {} after the command.", A::NAME), false));
            let mut o = json!({ "operationId": format!("{name}_{}", op_id(command)), "tags": tags,
                "summary": format!("Run command {command} on a {}.", A::NAME),
                "parameters": write_params, "responses": responses });
            if let Some(body) = request_body(g, op) {
                o["requestBody"] = body;
            }
            paths.insert(
                format!("/{plural}/{{id}}/{command}"),
                json!({ "parameters": [r("parameters", "kes.Id")], "post": o }),
            );
        }
    }
}

/// `GET /{plural}/{id}/events`: the audit history, page by page.
fn history_path<A: Aggregate>(cx: &Cx<'_, A>) -> Value {
    let Cx { name, tags, rules, .. } = cx;
    let mut history = refs(&["400", "404", "500", "503"]);
    forbidden(&mut history, rules.read_text());
    history.insert(
        "200".into(),
        json!({ "description": "One page of events, oldest first.",
                "headers": { "KES-Consistency": r("headers", "KES-Consistency") },
                "content": { "application/json": { "schema": r("schemas", "kes.History") } } }),
    );
    let max = kes_core::HISTORY_MAX_PAGE;
    json!({ "parameters": [r("parameters", "kes.Id")],
                "get": { "operationId": format!("{name}_events"), "tags": tags,
                         "summary": format!("The audit history of one {}, page by page.", A::NAME),
                         "description": "Pages follow versions: every event appears on exactly one page even \
                             while the aggregate takes new commands. 404 when the aggregate has no events.",
                         "parameters": [
                             { "name": "page[size]", "in": "query", "required": false,
                               "description": "Events per page.",
                               "schema": { "type": "integer", "minimum": 1, "maximum": max,
                                           "default": crate::request::HISTORY_DEFAULT_PAGE } },
                             { "name": "page[after]", "in": "query", "required": false,
                               "description": "Start after this version (the `next` of the previous page).",
                               "schema": { "type": "integer", "minimum": 0, "maximum": u64::MAX, "default": 0 } },
                             r("parameters", "kes.Position")
                         ],
                         "responses": history } })
}

/// The live feeds: `/{plural}/changes` and `/{plural}/{id}/changes`.
fn feed_paths<A: Aggregate>(cx: &Cx<'_, A>, paths: &mut Map<String, Value>) {
    let Cx { plural, name, tags, rules, .. } = cx;
    let last_event_id = |description: &str| {
        json!({ "name": "Last-Event-ID", "in": "header", "required": false, "description": description,
                "schema": { "type": "string", "maxLength": 4096 } })
    };
    paths.insert(
        format!("/{plural}/changes"),
        json!({ "get": { "operationId": format!("{name}_changes"), "tags": tags,
            "summary": format!("A live feed of the {} list's changes (Server-Sent Events).", A::NAME),
            "description": "Events: `change` (data `{id, version, row}`: the row as the list view has it), \
                `remove` (data `{id, version}`: deleted, or no longer matching the feed's filters), `progress` \
                (only moves the resume token), `reset` (data `{reason}`: reload the list, then reconnect; sent \
                to a client that read too slowly before it is cut off). Changes of one row that the view \
                applied together arrive as one event at its latest version. Each event's SSE `id` is a resume \
                token (PARTITION:NEXT_OFFSET[,…]); send it back as `Last-Event-ID` (browsers do) or `after` \
                to replay exactly what followed it. Filters and `q` use the list syntax; sorting and paging \
                are refused. Comments keep idle connections open.",
            "parameters": [
                last_event_id("Resume after this token."),
                { "name": "after", "in": "query", "required": false,
                  "description": "Resume after this token (when the client cannot set Last-Event-ID).",
                  "schema": { "type": "string", "pattern": "^([0-9]{1,10}:[0-9]{1,20}(,[0-9]{1,10}:[0-9]{1,20})*)?$" } },
                { "name": "filter", "in": "query", "required": false, "style": "deepObject", "explode": true,
                  "description": "As on the list: `filter[FIELD]=V`, `filter[FIELD][OP]=V`.",
                  "schema": { "type": "object", "additionalProperties": true } },
                { "name": "q", "in": "query", "required": false,
                  "schema": { "type": "string", "maxLength": 256, "pattern": "^[^\u{0}-\u{1f}\u{7f}-\u{9f}]*$" } }
            ],
            "responses": {
                "200": { "description": "The feed, until the client or the server closes it.",
                         "content": { "text/event-stream": { "schema": { "type": "string" } } } },
                "400": r("responses", "kes.BadRequest"), "500": r("responses", "kes.Internal"),
                "503": r("responses", "kes.Unavailable")
            } } }),
    );
    paths.insert(
        format!("/{plural}/{{id}}/changes"),
        json!({ "parameters": [r("parameters", "kes.Id")],
            "get": { "operationId": format!("{name}_item_changes"), "tags": tags,
            "summary": format!("A live feed of one {}'s new versions (Server-Sent Events).", A::NAME),
            "description": "Events: `state` (data `{version, etag, state}`, SSE `id` = the version) and \
                `deleted`. The current state comes first unless `Last-Event-ID` already names its version.",
            "parameters": [last_event_id("The version the client has.")],
            "responses": {
                "200": { "description": "The feed.", "content": { "text/event-stream": { "schema": { "type": "string" } } } },
                "400": r("responses", "kes.BadRequest"), "500": r("responses", "kes.Internal"),
                "503": r("responses", "kes.Unavailable")
            } } }),
    );
    for feed in [format!("/{plural}/changes"), format!("/{plural}/{{id}}/changes")] {
        if let Some(responses) =
            paths.get_mut(&feed).and_then(|p| p.pointer_mut("/get/responses")).and_then(Value::as_object_mut)
        {
            forbidden(responses, rules.read_text());
        }
    }
}
