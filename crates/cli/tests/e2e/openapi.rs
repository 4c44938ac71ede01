//! The OpenAPI document against the running service: every route called as a client would,
//! each answer's status documented for its route, and each body valid against the schema the
//! document gives for that status.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::common::*;

/// Where `value` breaks `schema` (JSON Schema 2020-12, the keywords the document uses; any
/// other keyword is a failure here, so that a new one cannot pass unchecked).
fn violations(doc: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    let Some(schema) = schema.as_object() else {
        if schema == &Value::Bool(false) {
            out.push(format!("{at}: nothing is allowed here"));
        }
        return;
    };
    for (keyword, rule) in schema {
        match keyword.as_str() {
            "$ref" => {
                let name = rule.as_str().unwrap().strip_prefix("#/components/schemas/").expect("a component");
                let target = &doc["components"]["schemas"][name];
                assert!(target.is_object(), "{at}: $ref to a missing schema {name}");
                violations(doc, target, value, at, out);
            }
            "type" => {
                let types: Vec<&str> = match rule {
                    Value::Array(list) => list.iter().map(|t| t.as_str().unwrap()).collect(),
                    t => vec![t.as_str().unwrap()],
                };
                let fits = |t: &str| match t {
                    "null" => value.is_null(),
                    "boolean" => value.is_boolean(),
                    "integer" => value.is_i64() || value.is_u64(),
                    "number" => value.is_number(),
                    "string" => value.is_string(),
                    "array" => value.is_array(),
                    "object" => value.is_object(),
                    other => panic!("{at}: unknown type {other}"),
                };
                if !types.iter().any(|t| fits(t)) {
                    out.push(format!("{at}: {value} is not {types:?}"));
                }
            }
            "properties" => {
                if let Some(object) = value.as_object() {
                    for (name, sub) in rule.as_object().unwrap() {
                        if let Some(v) = object.get(name) {
                            violations(doc, sub, v, &format!("{at}.{name}"), out);
                        }
                    }
                }
            }
            "required" => {
                if let Some(object) = value.as_object() {
                    for name in rule.as_array().unwrap() {
                        if !object.contains_key(name.as_str().unwrap()) {
                            out.push(format!("{at}: {name} is required but missing"));
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(object) = value.as_object() {
                    let known = schema.get("properties").and_then(Value::as_object);
                    for (name, v) in object {
                        if !known.is_some_and(|k| k.contains_key(name)) {
                            violations(doc, rule, v, &format!("{at}.{name}"), out);
                        }
                    }
                }
            }
            "maxProperties" => {
                if value.as_object().is_some_and(|o| o.len() as u64 > rule.as_u64().unwrap()) {
                    out.push(format!("{at}: more than {rule} properties"));
                }
            }
            "items" => {
                for (i, item) in value.as_array().into_iter().flatten().enumerate() {
                    violations(doc, rule, item, &format!("{at}[{i}]"), out);
                }
            }
            "enum" => {
                if !rule.as_array().unwrap().contains(value) {
                    out.push(format!("{at}: {value} is not one of {rule}"));
                }
            }
            "const" => {
                if rule != value {
                    out.push(format!("{at}: {value} is not {rule}"));
                }
            }
            "minimum" | "maximum" => {
                if let (Some(v), Some(limit)) = (value.as_f64(), rule.as_f64())
                    && ((keyword == "minimum" && v < limit) || (keyword == "maximum" && v > limit))
                {
                    out.push(format!("{at}: {v} is beyond the {keyword} {limit}"));
                }
            }
            "anyOf" | "oneOf" | "allOf" => {
                let passing = rule
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|sub| {
                        let mut found = Vec::new();
                        violations(doc, sub, value, at, &mut found);
                        found.is_empty()
                    })
                    .count();
                let total = rule.as_array().unwrap().len();
                let ok = match keyword.as_str() {
                    "anyOf" => passing > 0,
                    "oneOf" => passing == 1,
                    _ => passing == total,
                };
                if !ok {
                    out.push(format!("{at}: {value} matches {passing} of the {total} schemas of {keyword}"));
                }
            }
            "description" | "default" | "format" | "title" | "examples" => {}
            other => panic!("{at}: the schema keyword {other} is not checked here"),
        }
    }
}

/// Calls a route and checks that the status and the body are what the document says for it.
struct Client {
    doc: Value,
    port: u16,
    /// Each route answered 2xx, as `METHOD /path/{template}`.
    succeeded: BTreeSet<String>,
}

impl Client {
    fn call(&mut self, method: &str, template: &str, concrete: &str, body: &str) -> (u16, Value) {
        let (status, answer) = http(self.port, method, concrete, body);
        let op = &self.doc["paths"][template][method.to_ascii_lowercase()];
        assert!(op.is_object(), "{method} {template} is not in the document");
        let responses = op["responses"].as_object().unwrap();
        let documented = responses
            .get(&status.to_string())
            .or_else(|| (200..300).contains(&status).then(|| responses.get("2XX")).flatten())
            .unwrap_or_else(|| panic!("{method} {concrete} answered {status}, not documented: {answer}"));
        let value = match documented.get("content") {
            Some(content) if content.get("message/rfc822").is_some() => {
                assert!(answer.contains("Message-ID: <") && answer.contains("\r\n\r\n"), "{concrete}: {answer}");
                Value::String(answer)
            }
            Some(content) => {
                let value: Value = serde_json::from_str(&answer)
                    .unwrap_or_else(|e| panic!("{method} {concrete} {status}: not JSON ({e}): {answer}"));
                let mut found = Vec::new();
                violations(&self.doc, &content["application/json"]["schema"], &value, "answer", &mut found);
                assert!(found.is_empty(), "{method} {concrete} {status}: {found:#?}\n{answer}");
                value
            }
            None => {
                assert!(answer.is_empty(), "{method} {concrete} {status}: a body the document does not give: {answer}");
                Value::Null
            }
        };
        if (200..300).contains(&status) {
            self.succeeded.insert(format!("{method} {template}"));
        }
        (status, value)
    }

    /// As `call`, for a path without parameters; the answer must be a success.
    fn ok(&mut self, method: &str, path: &str, body: &Value) -> Value {
        self.ok_at(method, path, path, body)
    }

    fn ok_at(&mut self, method: &str, template: &str, concrete: &str, body: &Value) -> Value {
        let body = if body.is_null() { String::new() } else { body.to_string() };
        let (status, value) = self.call(method, template, concrete, &body);
        assert!((200..300).contains(&status), "{method} {concrete}: {status} {value}");
        value
    }
}

#[test]
fn every_answer_is_valid_against_the_schema_its_openapi_entry_documents() {
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &[]);
    env.trust_authority();
    let port = env.serve();
    let (status, doc) = http(port, "GET", "/api/openapi.json", "");
    assert_eq!(status, 200);
    let mut c = Client { doc: serde_json::from_str(&doc).unwrap(), port, succeeded: BTreeSet::new() };
    // The checker itself: an id as a string (what the review found) and a missing field fail.
    let mut found = Vec::new();
    let summary = json!({"$ref": "#/components/schemas/MessageSummary"});
    violations(&c.doc, &summary, &json!({"id": "17", "state": "delivered"}), "summary", &mut found);
    assert!(found.iter().any(|f| f.contains("summary.id")), "{found:?}");
    assert!(found.iter().any(|f| f.contains("\"subject\" is required")), "{found:?}");

    c.ok("GET", "/api/v1/me", &Value::Null);
    c.ok("GET", "/api/v1/settings/smtp", &Value::Null);
    c.ok("GET", "/api/v1/settings/smtp/schema", &Value::Null);
    c.ok("PUT", "/api/v1/settings/smtp", &json!({"from": "Panel <panel@example.org>"}));
    c.ok("GET", "/api/v1/settings/smtp/versions", &Value::Null);
    let restore = "/api/v1/settings/smtp/versions/{version}/restore";
    c.ok_at("POST", restore, &restore.replace("{version}", "1"), &Value::Null);
    let check = c.ok("POST", "/api/v1/smtp/check", &Value::Null);
    assert_eq!(check["ok"], true, "{check}");
    // A standby route, added and removed (after the check: it points at a closed port).
    let route = "/api/v1/settings/smtp/routes/{name}";
    let standby = route.replace("{name}", "standby");
    let added = c.ok_at("PUT", route, &standby, &json!({"host": "127.0.0.1", "port": 9, "security": "none"}));
    assert_eq!(added["effective"]["routes"][0]["name"], "standby", "{added}");
    c.ok_at("DELETE", route, &standby, &Value::Null);

    // Messages: the Test Message waited for, one sent, a bulk, and the log.
    let test = c.ok("POST", "/api/v1/smtp/test", &json!({"wait": 20}));
    assert_eq!(test["message"]["state"], "delivered", "{test}");
    let draft = json!({"to": ["a@example.org"], "subject": "Schema", "text": "checked"});
    let sent = c.ok("POST", "/api/v1/messages", &draft);
    let id = sent["id"].as_i64().unwrap().to_string();
    c.ok("POST", "/api/v1/messages/bulk", &json!({"messages": [draft, draft]}));
    c.ok("GET", "/api/v1/messages", &Value::Null);
    c.ok_at("GET", "/api/v1/messages/{id}", &format!("/api/v1/messages/{id}"), &Value::Null);
    c.ok_at("GET", "/api/v1/messages/{id}/eml", &format!("/api/v1/messages/{id}/eml"), &Value::Null);
    // Delivered or still queued, a message is neither retried nor, once sent, cancelled:
    // whichever answer comes, it is one the document gives.
    c.call("POST", "/api/v1/messages/{id}/retry", &format!("/api/v1/messages/{id}/retry"), "");
    let cancel = json!({"reason": "schema check"}).to_string();
    c.call("POST", "/api/v1/messages/{id}/cancel", &format!("/api/v1/messages/{id}/cancel"), &cancel);
    c.ok("POST", "/api/v1/messages/retry", &json!({"status": "failed", "since": "1h"}));
    c.ok("GET", "/api/v1/services", &Value::Null);
    c.ok("GET", "/api/v1/queue", &Value::Null);
    c.ok("GET", "/api/v1/dashboard", &Value::Null);

    // Licenses, credentials, tokens, audit.
    let key = env.issue(&["--feature", "credential-storage"]);
    let license = c.ok("POST", "/api/v1/licenses", &json!({"key": key}));
    c.ok("GET", "/api/v1/licenses", &Value::Null);
    let credential = json!({"kind": "password", "username": "panel", "secret": "a test password"});
    c.ok_at("PUT", "/api/v1/credentials/{name}", "/api/v1/credentials/spare", &credential);
    c.ok("GET", "/api/v1/credentials", &Value::Null);
    c.ok_at("DELETE", "/api/v1/credentials/{name}", "/api/v1/credentials/spare", &Value::Null);
    let license_id = license["id"].as_str().unwrap();
    c.ok_at("DELETE", "/api/v1/licenses/{id}", &format!("/api/v1/licenses/{license_id}"), &Value::Null);
    env.api_token("vera", "viewer");
    let tokens = c.ok("GET", "/api/v1/tokens", &Value::Null);
    let vera = tokens.as_array().unwrap().iter().find(|t| t["admin"] == "vera").expect("vera's token");
    let vera = vera["id"].as_str().unwrap();
    c.ok_at("DELETE", "/api/v1/tokens/{id}", &format!("/api/v1/tokens/{vera}"), &Value::Null);
    c.ok("GET", "/api/v1/audit", &Value::Null);

    // Templates, workflows, events, schedules, dispatch, runs.
    let t = |path: &str| format!("/api/v1/templates/{path}");
    let template = json!({"subject": "Hi {{ object.name }}", "text": "Welcome"});
    c.ok_at("PUT", "/api/v1/templates/{name}", &t("welcome"), &template);
    c.ok("GET", "/api/v1/templates", &Value::Null);
    c.ok_at("GET", "/api/v1/templates/{name}", &t("welcome"), &Value::Null);
    let render = json!({"object": {"name": "Eve"}});
    c.ok_at("POST", "/api/v1/templates/{name}/render", &t("welcome/render"), &render);
    let steps = json!([{"kind": "email", "template": "welcome", "to": ["{{ object.mail }}"]}]);
    let workflow = json!({"name": "welcome", "trigger": "user.created", "steps": steps});
    c.ok("POST", "/api/v1/workflows", &workflow);
    c.ok("GET", "/api/v1/workflows", &Value::Null);
    let w = |path: &str| format!("/api/v1/workflows/welcome{path}");
    c.ok_at("GET", "/api/v1/workflows/{name}", &w(""), &Value::Null);
    c.ok_at("PUT", "/api/v1/workflows/{name}", &w(""), &workflow);
    c.ok_at("POST", "/api/v1/workflows/{name}/disable", &w("/disable"), &Value::Null);
    c.ok_at("POST", "/api/v1/workflows/{name}/enable", &w("/enable"), &Value::Null);
    let event = json!({"type": "user.created", "object": {"name": "Eve", "mail": "eve@example.org"}});
    let event = c.ok("POST", "/api/v1/events", &event);
    let run = event["runs"][0]["id"].as_i64().expect("the workflow ran");
    c.ok_at("GET", "/api/v1/runs/{id}", &format!("/api/v1/runs/{run}"), &Value::Null);
    c.ok_at("GET", "/api/v1/workflows/{name}/history", &w("/history"), &Value::Null);
    let schedule = json!({"name": "weekly", "cron": "0 9 * * 1", "data": {"name": "Team"},
        "steps": [{"kind": "email", "template": "welcome", "to": ["team@example.org"]}]});
    c.ok("POST", "/api/v1/schedules", &schedule);
    c.ok("GET", "/api/v1/schedules", &Value::Null);
    let s = |path: &str| format!("/api/v1/schedules/weekly{path}");
    c.ok_at("GET", "/api/v1/schedules/{name}", &s(""), &Value::Null);
    c.ok_at("PUT", "/api/v1/schedules/{name}", &s(""), &schedule);
    c.ok_at("POST", "/api/v1/schedules/{name}/disable", &s("/disable"), &Value::Null);
    c.ok_at("POST", "/api/v1/schedules/{name}/enable", &s("/enable"), &Value::Null);
    c.ok_at("GET", "/api/v1/schedules/{name}/next", &s("/next?count=3"), &Value::Null);
    c.ok_at("POST", "/api/v1/schedules/{name}/run", &s("/run"), &Value::Null);
    c.ok_at("GET", "/api/v1/schedules/{name}/history", &s("/history"), &Value::Null);
    let dispatch = json!({"name": "ci", "steps": [{"kind": "email", "subject": "CI done", "text": "ok"}]});
    c.ok("POST", "/api/v1/dispatch", &dispatch);
    c.ok_at("DELETE", "/api/v1/schedules/{name}", &s(""), &Value::Null);
    c.ok_at("DELETE", "/api/v1/workflows/{name}", &w(""), &Value::Null);
    c.ok_at("DELETE", "/api/v1/templates/{name}", &t("welcome"), &Value::Null);

    // With everything delivered, the log and the dashboard carry real attempts and replies.
    // (How many depends on whether the cancel above came before the send: wait for an idle queue.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let q = c.ok("GET", "/api/v1/queue", &Value::Null);
        let waiting = ["queued", "retrying", "sending"].iter().map(|k| q[k].as_i64().unwrap()).sum::<i64>();
        if waiting == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the queue did not drain: {q}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(sink.total() >= 5, "{}", sink.total());
    c.ok("GET", "/api/v1/messages", &Value::Null);
    c.ok_at("GET", "/api/v1/messages/{id}", &format!("/api/v1/messages/{id}"), &Value::Null);
    c.ok("GET", "/api/v1/dashboard", &Value::Null);
    c.ok("GET", "/api/v1/bounces", &Value::Null);

    // Every route but the two whose success needs a failed or a waiting message answered 2xx.
    let all: BTreeSet<String> = panel_web::ROUTES.iter().map(|(m, p, _, _)| format!("{m} {p}")).collect();
    let missing: Vec<&String> = all.difference(&c.succeeded).collect();
    assert_eq!(missing, ["POST /api/v1/messages/{id}/cancel", "POST /api/v1/messages/{id}/retry"]);
}

/// A body that is not a JSON object is refused by every route that reads one, with an answer
/// the document gives, and changes nothing (`[null,null]` once stored a settings version).
#[test]
fn bodies_that_are_not_objects_are_refused_by_every_route_that_reads_one() {
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &[]);
    let port = env.serve();
    let (_, doc) = http(port, "GET", "/api/openapi.json", "");
    let mut c = Client { doc: serde_json::from_str(&doc).unwrap(), port, succeeded: BTreeSet::new() };
    let routes: Vec<(String, String)> = c.doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| (m.to_ascii_uppercase(), path.clone())))
        .filter(|(m, _)| m == "POST" || m == "PUT")
        .filter(|(m, path)| {
            // Routes that read no body document it as an empty object and ignore it.
            let schema =
                &c.doc["paths"][path][m.to_ascii_lowercase()]["requestBody"]["content"]["application/json"]["schema"];
            schema["maxProperties"] != 0
        })
        .collect();
    assert!(routes.len() >= 15, "{routes:?}");
    for (method, template) in routes {
        let concrete = template.replace("{id}", "1").replace("{version}", "1").replace("{name}", "x");
        for body in ["[null,null]", "null", "7", "\"text\""] {
            let (status, answer) = c.call(&method, &template, &concrete, body);
            assert!(status == 400 || status == 404, "{method} {concrete} with {body}: {status} {answer}");
        }
    }
    let (_, versions) = c.call("GET", "/api/v1/settings/smtp/versions", "/api/v1/settings/smtp/versions", "");
    assert_eq!(versions["versions"].as_array().unwrap().len(), 1, "nothing stored: {versions}");
}
