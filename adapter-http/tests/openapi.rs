//! The OpenAPI document: valid OpenAPI 3.1, complete, and true to the
//! answers the routes give.
//!
//! Validation has two layers. `tests/fixtures/oas-3.1-schema.json` writes
//! the rules of an OpenAPI 3.1 document (objects, required fields, allowed
//! keys, parameter styles, response codes, component names) as a JSON
//! Schema 2020-12 document; the `jsonschema` crate checks the document
//! against it with formats on. Schema Objects are JSON Schemas in 3.1, so
//! each one found in the document is then checked against the JSON Schema
//! 2020-12 meta-schema (bundled with `jsonschema`), and every `$ref` must
//! resolve inside the document. The crates that parse OpenAPI in Rust
//! either target 3.0 or accept unknown keys, so they would not catch what
//! these checks catch.

mod common;

use std::sync::Arc;

use common::*;
use kes_core::{CommandBus, Field, InMemoryStore, InMemoryView, ProjectionRunner, RunnerConfig, ViewSchema};
use kes_http::{Api, HttpConfig, Resource};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A second aggregate, to mount two on one router.
#[derive(Debug, Default, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct Counter {
    value: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Added {
    by: i64,
}

impl kes_core::DomainEvent for Added {
    fn event_type(&self) -> &'static str {
        "Added"
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a counter never goes below zero")]
struct BelowZero;

impl kes_core::Aggregate for Counter {
    const NAME: &'static str = "counter";
    type Command = i64;
    type Event = Added;
    type Error = BelowZero;
    fn handle(&self, by: i64) -> Result<Vec<Added>, BelowZero> {
        if self.value + by < 0 {
            return Err(BelowZero);
        }
        Ok(vec![Added { by }])
    }
    fn apply(&mut self, e: &Added) {
        self.value += e.by;
    }
}

/// Adds to a counter.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct Add {
    by: i64,
}

async fn two_aggregates() -> axum::Router {
    let projects = InMemoryStore::<Project>::new();
    let project_view = Arc::new(InMemoryView::new(view_schema()).unwrap());
    let project_runner = ProjectionRunner::new(
        projects.clone(),
        vec![Arc::new(kes_core::ViewProjection::<Project>::new(project_view.clone(), row))],
        RunnerConfig::default(),
    );
    project_runner.start().await.unwrap();
    let counters = InMemoryStore::<Counter>::new();
    let counter_view =
        Arc::new(InMemoryView::new(ViewSchema::new("counters", 1).field(Field::integer("value").sortable())).unwrap());
    let counter_runner = ProjectionRunner::new(
        counters.clone(),
        vec![Arc::new(kes_core::ViewProjection::<Counter>::new(counter_view.clone(), |c: &Counter| {
            [("value".to_owned(), c.value.into())].into()
        }))],
        RunnerConfig::default(),
    );
    counter_runner.start().await.unwrap();
    let counter_resource = Resource::<Counter>::new("counters").create(|_: ()| 0).command("add", |a: Add| a.by);
    Api::new(HttpConfig::default())
        .mount(resource(), Arc::new(CommandBus::new(projects)), project_view, project_runner.clone())
        .unwrap()
        .mount(counter_resource, Arc::new(CommandBus::new(counters)), counter_view, counter_runner.clone())
        .unwrap()
        .projections(project_runner)
        .projections(counter_runner)
        .into_router()
}

async fn document() -> (axum::Router, Value) {
    let app = two_aggregates().await;
    let reply = send(&app, empty("GET", "/openapi.json")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), "application/json");
    (app, reply.body)
}

fn oas_validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(include_str!("fixtures/oas-3.1-schema.json")).unwrap();
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the fixture is a valid schema")
}

fn oas_errors(doc: &Value) -> Vec<String> {
    oas_validator().iter_errors(doc).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

/// Every Schema Object of the document, with where it sits.
fn schema_objects(doc: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (name, s) in doc["components"]["schemas"].as_object().unwrap() {
        out.push((format!("components/schemas/{name}"), s.clone()));
    }
    fn walk(v: &Value, at: &str, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    let here = format!("{at}/{k}");
                    if k == "schema" {
                        out.push((here.clone(), child.clone()));
                    }
                    walk(child, &here, out);
                }
            }
            Value::Array(items) => items.iter().enumerate().for_each(|(i, c)| walk(c, &format!("{at}/{i}"), out)),
            _ => {}
        }
    }
    walk(&doc["paths"], "paths", &mut out);
    walk(&doc["components"]["parameters"], "components/parameters", &mut out);
    walk(&doc["components"]["headers"], "components/headers", &mut out);
    out
}

fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                out.push(r.clone());
            }
            map.values().for_each(|c| refs(c, out));
        }
        Value::Array(items) => items.iter().for_each(|c| refs(c, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_is_valid_openapi_3_1() {
    let (_, doc) = document().await;
    assert_eq!(doc["openapi"], "3.1.0");
    let errors = oas_errors(&doc);
    assert!(errors.is_empty(), "{errors:#?}");
    for (at, schema) in schema_objects(&doc) {
        if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
            panic!("{at} is not a JSON Schema 2020-12: {e}\n{schema}");
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 50);
    for r in all {
        let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("external $ref {r}"));
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_validator_refuses_documents_that_break_the_rules() {
    let (_, doc) = document().await;
    let mut broken = doc.clone();
    broken["paths"]["/projects/{id}"]["get"]["operationID"] = json!("typo");
    assert!(!oas_errors(&broken).is_empty(), "unknown operation keys are refused");
    let mut broken = doc.clone();
    broken["components"]["parameters"]["kes.Id"]["required"] = json!(false);
    assert!(!oas_errors(&broken).is_empty(), "path parameters must be required");
    let mut broken = doc.clone();
    broken["paths"]["/projects"]["get"]["responses"]["20x"] = json!({ "description": "?" });
    assert!(!oas_errors(&broken).is_empty(), "response codes are checked");
    let mut broken = doc.clone();
    broken["openapi"] = json!("3.0.3");
    assert!(!oas_errors(&broken).is_empty(), "3.0 is not 3.1");
    let mut broken = doc;
    broken["info"].as_object_mut().unwrap().remove("version");
    assert!(!oas_errors(&broken).is_empty(), "info.version is required");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_of_every_mounted_aggregate_is_described() {
    let (_, doc) = document().await;
    let methods = |path: &str| -> Vec<String> {
        let mut m: Vec<String> = doc["paths"][path]
            .as_object()
            .unwrap_or_else(|| panic!("{path} missing"))
            .keys()
            .filter(|k| *k != "parameters")
            .cloned()
            .collect();
        m.sort();
        m
    };
    assert_eq!(methods("/projects"), ["get", "post"]);
    assert_eq!(methods("/projects/{id}"), ["delete", "get", "patch", "put"]);
    assert_eq!(methods("/projects/{id}/events"), ["get"]);
    assert_eq!(methods("/projects/{id}/archive"), ["post"]);
    assert_eq!(methods("/counters"), ["get", "post"]);
    assert_eq!(methods("/counters/{id}"), ["get"]);
    assert_eq!(methods("/counters/{id}/add"), ["post"]);
    for path in ["/health", "/metrics", "/openapi.json"] {
        assert_eq!(methods(path), ["get"]);
    }
    let list_params: Vec<&str> = doc["paths"]["/projects"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for expected in
        ["sort", "page[size]", "page[after]", "q", "filter[name]", "filter[budget][gte]", "filter[name][prefix]"]
    {
        assert!(list_params.contains(&expected), "{expected} missing from {list_params:?}");
    }
    assert!(!list_params.contains(&"filter[budget][prefix]"), "prefix is for text only");
    let patch = &doc["paths"]["/projects/{id}"]["patch"];
    assert_eq!(
        patch["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/PatchProject"
    );
    assert_eq!(patch["requestBody"]["description"], "Changes some fields of a project.");
    for code in ["200", "400", "404", "409", "412", "413", "415", "422", "503"] {
        assert!(patch["responses"][code].is_object(), "PATCH lacks {code}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_match_the_schemas_the_document_gives() {
    let (app, doc) = document().await;
    let validator_for = |component: &str| {
        let mut root = doc.clone();
        root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
        root["$ref"] = json!(format!("#/components/schemas/{component}"));
        jsonschema::draft202012::new(&root).unwrap()
    };
    let (id, created) = create(&app, "Described", 4).await;
    assert!(validator_for("Project").is_valid(&created.body), "{}", created.body);
    let page = send(&app, with_header(empty("GET", "/projects"), "kes-position", created.header("kes-position"))).await;
    assert_eq!(page.body["total"], 1);
    let errors: Vec<String> = validator_for("projects.Page").iter_errors(&page.body).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?} {}", page.body);
    let history = send(&app, empty("GET", &format!("/projects/{id}/events"))).await;
    assert!(validator_for("kes.History").is_valid(&history.body), "{}", history.body);
    let problem = send(&app, empty("GET", "/projects/none")).await;
    assert!(validator_for("kes.Problem").is_valid(&problem.body));
    let health = send(&app, empty("GET", "/health")).await;
    assert!(validator_for("kes.Health").is_valid(&health.body), "{}", health.body);
    // A wrong answer would be caught.
    assert!(!validator_for("projects.Page").is_valid(&json!({ "items": [{ "id": 1 }], "next": null, "total": 1 })));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_aggregates_share_one_router() {
    let app = two_aggregates().await;
    let created = send(&app, empty("POST", "/counters")).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let location = created.header("location").to_owned();
    assert!(location.starts_with("/counters/"));
    let added = send(&app, json("POST", &format!("{location}/add"), json!({ "by": 3 }))).await;
    assert_eq!(added.body, json!({ "value": 3 }));
    let refused = send(&app, json("POST", &format!("{location}/add"), json!({ "by": -10 }))).await;
    refused.assert_problem(422, "rejected");
    assert_eq!(refused.body["detail"], "a counter never goes below zero");
    let (_, project) = create(&app, "Both", 1).await;
    assert_eq!(project.status, 201);
    let metrics = send(&app, empty("GET", "/metrics")).await.body.as_str().unwrap().to_owned();
    assert!(metrics.contains("kes_projection_lag{projection=\"counters\"}"), "{metrics}");
    assert!(metrics.contains("aggregate=\"counter\",command=\"add\",outcome=\"rejected\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mounting_refuses_bad_and_duplicate_names() {
    let mount = |r: Resource<Project>| {
        let store = InMemoryStore::<Project>::new();
        let view = Arc::new(InMemoryView::new(view_schema()).unwrap());
        let runner = ProjectionRunner::new(store.clone(), Vec::new(), RunnerConfig::default());
        Api::new(HttpConfig::default()).mount(r, Arc::new(CommandBus::new(store)), view, runner)
    };
    assert!(mount(Resource::new("Projects")).is_err());
    assert!(mount(Resource::new("health")).is_err());
    assert!(mount(Resource::new("projects").command("events", |_: ()| ProjectCommand::Delete)).is_err());
    assert!(mount(Resource::new("projects").command("with space", |_: ()| ProjectCommand::Delete)).is_err());
    let twice = mount(resource()).unwrap();
    let store = InMemoryStore::<Project>::new();
    let view = Arc::new(InMemoryView::new(view_schema()).unwrap());
    let runner = ProjectionRunner::new(store.clone(), Vec::new(), RunnerConfig::default());
    assert!(twice.mount(resource(), Arc::new(CommandBus::new(store)), view, runner).is_err());
}
