//! Sign-in and access control for the UI and the API. A browser signs in with a name and
//! password and gets an HttpOnly, SameSite=Strict session cookie; every state-changing request
//! from a session must carry its CSRF token in `X-CSRF-Token`. Scripts send an API token as
//! `Authorization: Bearer ...` (not ambient, so no CSRF token). Each API route names the least
//! role it needs in `ROUTES`, which also generates the OpenAPI document.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use panel_service::Panel;
use panel_service::accounts::{Actor, Role};
use std::collections::HashMap;

use serde_json::json;

use crate::routes::ROUTES;

pub const SESSION_COOKIE: &str = "panel_session";

fn path_matches(pattern: &str, path: &str) -> bool {
    let (mut p, mut q) = (pattern.split('/'), path.split('/'));
    loop {
        match (p.next(), q.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a.starts_with('{') || a == b => {}
            _ => return false,
        }
    }
}

/// `ROUTES` arranged for `required_role`, which every request asks: the routes without a
/// parameter by method and path (one lookup), and those with one by method, each with its path
/// up to its first parameter. Walking the whole table matched each request's path against up
/// to 59 patterns segment by segment, a cost in every API request (more for routes listed late).
struct RouteRoles {
    exact: HashMap<(&'static str, &'static str), Role>,
    /// Method, the pattern's literal start, the pattern, its role; in the table's order.
    patterned: Vec<(&'static str, &'static str, &'static str, Role)>,
}

fn route_roles() -> &'static RouteRoles {
    static ROLES: std::sync::OnceLock<RouteRoles> = std::sync::OnceLock::new();
    ROLES.get_or_init(|| {
        let mut roles = RouteRoles { exact: HashMap::new(), patterned: Vec::new() };
        for &(method, pattern, role, _) in ROUTES {
            match pattern.find('{') {
                // The first listed wins, as in a walk of the table.
                None => _ = roles.exact.entry((method, pattern)).or_insert(role),
                Some(i) => roles.patterned.push((method, &pattern[..i], pattern, role)),
            }
        }
        roles
    })
}

/// The least role a request needs: from `ROUTES` for the API, viewer for pages.
pub fn required_role(method: &Method, path: &str) -> Role {
    // HEAD is GET without the body: it needs what GET needs.
    let method = if method == Method::HEAD { &Method::GET } else { method };
    let roles = route_roles();
    // A path that is a route without a parameter is that route, as the router dispatches it
    // (a literal segment before a parameter), wherever the table lists it.
    roles
        .exact
        .get(&(method.as_str(), path))
        .or_else(|| {
            roles
                .patterned
                .iter()
                .find(|(m, start, pattern, _)| {
                    *m == method.as_str() && path.starts_with(start) && path_matches(pattern, path)
                })
                .map(|(.., role)| role)
        })
        .copied()
        .unwrap_or(if method == Method::GET { Role::Viewer } else { Role::Admin })
}

fn is_public(path: &str) -> bool {
    // `/setup/TOKEN` carries its own proof: the one-time token `panel serve` printed.
    matches!(path, "/healthz" | "/readyz" | "/metrics" | "/login" | "/api/openapi.json")
        || path.starts_with("/static/")
        || path.starts_with("/setup/")
}

pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

fn refuse(api: bool, status: StatusCode, message: &str, path: &str) -> Response {
    if api || status != StatusCode::UNAUTHORIZED {
        return (status, axum::Json(json!({"error": message}))).into_response();
    }
    let next: String = form_urlencoded::byte_serialize(path.as_bytes()).collect();
    Redirect::to(&format!("/login?next={next}")).into_response()
}

/// Authenticates, checks the role and the CSRF token, and hands the actor to the handler.
pub async fn require_auth(State(panel): State<Panel>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if is_public(&path) {
        return next.run(req).await;
    }
    let api = path.starts_with("/api/");
    let headers = req.headers();
    let (token, from_cookie) = match bearer(headers) {
        Some(t) => (Some(t), false),
        None => (cookie(headers, SESSION_COOKIE), true),
    };
    let method = req.method().clone();
    let needed = required_role(&method, &path);
    // Sending one message writes one row, which can carry the fence of a token owner the
    // service kept (`Panel::authenticate_kept`): no read of the token for it. Every other
    // request reads its token.
    let checked = match (&token, &method, path.as_str()) {
        (None, ..) => Ok(None),
        (Some(t), &Method::POST, "/api/v1/messages") => panel.authenticate_kept(t, needed).await,
        (Some(t), ..) => panel.authenticate(t).await,
    };
    let actor = match checked {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot check the session");
            return refuse(true, StatusCode::SERVICE_UNAVAILABLE, "cannot check the session now", &path);
        }
    };
    let Some(actor) = actor.filter(|a| from_cookie == a.csrf.is_some()) else {
        return refuse(
            api,
            StatusCode::UNAUTHORIZED,
            "sign in first (or send an API token as Authorization: Bearer TOKEN)",
            &path,
        );
    };
    let changes_state = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    // Sign-out is a plain form post; its handler checks the token from the form body.
    if changes_state
        && path != "/logout"
        && let Some(expected) = &actor.csrf
    {
        let sent = req.headers().get("x-csrf-token").and_then(|v| v.to_str().ok());
        if sent != Some(expected.as_str()) {
            return refuse(
                true,
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token (X-CSRF-Token); reload the page and try again",
                &path,
            );
        }
    }
    if actor.role < needed {
        return refuse(true, StatusCode::FORBIDDEN, &panel_service::accounts::role_refusal(actor.role, needed), &path);
    }
    req.extensions_mut().insert(actor);
    next.run(req).await
}

/// The audit name of whoever made the request (set by `require_auth`).
pub struct By(pub String);

impl<S: Send + Sync> FromRequestParts<S> for By {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Actor>().map(|a| By(a.audit_name())).ok_or(StatusCode::UNAUTHORIZED)
    }
}

/// What was current when the request was authenticated: a handler that sends mail takes
/// the settings and workflows kept in memory when they are at least this new
/// (`Panel::as_seen`).
pub struct SeenBy(pub panel_service::Seen);

impl<S: Send + Sync> FromRequestParts<S> for SeenBy {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Actor>().map(|a| SeenBy(a.seen.clone())).ok_or(StatusCode::UNAUTHORIZED)
    }
}

/// The OpenAPI 3.1 document of `ROUTES`.
pub fn openapi() -> serde_json::Value {
    use schemars::generate::SchemaSettings;
    // OpenAPI 3.1 speaks JSON Schema 2020-12. What a request may send and what an answer
    // carries are described apart (serde's defaults make a field optional in one, present in
    // the other); a type whose two descriptions differ is named `...Input` where it is read.
    let settings = SchemaSettings::draft2020_12().with(|s| {
        s.definitions_path = "/components/schemas".into();
        s.meta_schema = None;
    });
    let mut reads = settings.clone().for_deserialize().into_generator();
    let mut writes = settings.for_serialize().into_generator();
    let error_ref = writes.subschema_for::<crate::answers::Error>().to_value();
    let schemas = crate::routes::route_schemas(&mut reads, &mut writes);
    let mut components = writes.take_definitions(true);
    let mut renamed = std::collections::HashMap::new();
    for (name, schema) in reads.take_definitions(true) {
        match components.get(&name) {
            Some(same) if *same == schema => {}
            Some(_) => {
                renamed.insert(name.clone(), format!("{name}Input"));
                components.insert(format!("{name}Input"), schema);
            }
            None => {
                components.insert(name, schema);
            }
        }
    }
    for name in renamed.values() {
        rename_refs(components.get_mut(name).expect("just inserted"), &renamed);
    }

    let mut paths = serde_json::Map::new();
    for ((method, path, role, summary), schema) in ROUTES.iter().zip(schemas) {
        // Messages and runs are numbered; tokens, licenses and named definitions are not.
        let numbered = path.starts_with("/api/v1/messages/") || path.starts_with("/api/v1/runs/");
        let mut params: Vec<serde_json::Value> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| {
                let integer = (name == "id" && numbered) || name == "version";
                let kind = if integer { json!({"type": "integer"}) } else { json!({"type": "string"}) };
                json!({"name": name, "in": "path", "required": true, "schema": kind})
            })
            .collect();
        let has_path_params = !params.is_empty();
        if let Some(query) = &schema.query {
            for (name, field) in query.get("properties").and_then(|p| p.as_object()).into_iter().flatten() {
                let mut field = field.clone();
                let description = field.as_object_mut().and_then(|f| f.remove("description"));
                let mut param = json!({"name": name, "in": "query", "required": false, "schema": field});
                if let Some(text) = description {
                    param["description"] = text;
                }
                params.push(param);
            }
        }
        let error = |text: &str| json!({"description": text, "content": {"application/json": {"schema": error_ref}}});
        let mut responses = json!({
            "400": error("Invalid input, every field's problem named"),
            "401": error("Not signed in"),
            "403": error("Role too low, a license missing, or a session request without its CSRF token"),
            "409": error("In conflict with what is stored (a name taken, nothing configured yet, not failed)"),
            "500": error("Panel failed inside"),
            "503": error("The database cannot be reached or written now"),
        });
        match &schema.answer {
            Some(answer) => {
                let answer = answer.clone().to_value();
                // A message file is not JSON: its own media type, its schema a string.
                let media =
                    if answer["$ref"] == "#/components/schemas/Eml" { "message/rfc822" } else { "application/json" };
                responses["2XX"] = json!({
                    "description": "Done: 200 with the answer, 201 when created, 202 when work was queued (a message, an event)",
                    "content": {media: {"schema": answer}},
                });
            }
            None => responses["204"] = json!({"description": "Done, without a body"}),
        }
        if has_path_params || (*path == "/api/v1/settings/smtp" && *method == "GET") {
            responses["404"] = error("No such item (for the settings: nothing saved yet)");
        }
        let mut op = json!({
            "summary": summary,
            "description": format!("Needs the role {} or higher.", role.as_str()),
            "parameters": params,
            "responses": responses,
        });
        if matches!(*method, "POST" | "PUT") {
            // A body is optional where no body has a meaning of its own (check the saved
            // settings, the Test Message to the Fallback recipient) or where none is read.
            let optional = schema.body.is_none() || matches!(*path, "/api/v1/smtp/check" | "/api/v1/smtp/test");
            let mut body = json!({"content": {"application/json": {"schema": {"type": "object", "maxProperties": 0}}}});
            if let Some(read) = schema.body {
                let mut read = read.to_value();
                rename_refs(&mut read, &renamed);
                body["content"]["application/json"]["schema"] = read;
            }
            body["required"] = json!(!optional);
            op["requestBody"] = body;
            op["responses"]["413"] = error("The body is larger than the size limit");
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[method.to_ascii_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Panel API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Everything the Panel web UI does. Authenticate with Authorization: Bearer TOKEN (panel admin token NAME), or a browser session plus X-CSRF-Token."},
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "components": {
            "securitySchemes": {
                "token": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE}
            },
            "schemas": components,
        },
        "security": [{"token": []}, {"session": []}],
        "paths": paths,
    })
}

/// Points each `$ref` to a renamed component at its new name.
fn rename_refs(schema: &mut serde_json::Value, renamed: &HashMap<String, String>) {
    match schema {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(target)) = map.get_mut("$ref")
                && let Some(new) = target.strip_prefix("#/components/schemas/").and_then(|name| renamed.get(name))
            {
                *target = format!("#/components/schemas/{new}");
            }
            map.values_mut().for_each(|v| rename_refs(v, renamed));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| rename_refs(v, renamed)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_the_route_table() {
        assert_eq!(required_role(&Method::PUT, "/api/v1/settings/smtp"), Role::Admin);
        assert_eq!(required_role(&Method::HEAD, "/api/v1/messages"), Role::Viewer, "HEAD follows GET");
        assert_eq!(required_role(&Method::POST, "/api/v1/smtp/test"), Role::Operator);
        assert_eq!(required_role(&Method::POST, "/api/v1/messages/17/retry"), Role::Operator);
        assert_eq!(required_role(&Method::GET, "/api/v1/messages/17"), Role::Viewer);
        assert_eq!(required_role(&Method::POST, "/api/v1/unknown"), Role::Admin, "unknown changes need admin");
        assert_eq!(required_role(&Method::GET, "/messages"), Role::Viewer);
        assert_eq!(required_role(&Method::POST, "/api/v1/messages/17"), Role::Admin, "unlisted method and path");
        assert_eq!(required_role(&Method::GET, "/api/v1/messages/17/retry/x"), Role::Viewer, "a segment too many");
    }

    #[test]
    fn every_route_needs_its_listed_role() {
        for &(method, pattern, role, _) in ROUTES {
            // Each parameter filled with a value no literal route has.
            let path: String =
                pattern.split('/').map(|s| if s.starts_with('{') { "17" } else { s }).collect::<Vec<_>>().join("/");
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(required_role(&method, &path), role, "{method} {path}");
        }
    }

    #[test]
    fn the_openapi_document_lists_every_route() {
        let doc = openapi();
        assert_eq!(doc["paths"]["/api/v1/messages/{id}/retry"]["post"]["parameters"][0]["name"], "id");
        let id = &doc["paths"]["/api/v1/messages/{id}"]["get"]["parameters"][0]["schema"]["type"];
        assert_eq!(id, "integer", "message ids are numbers");
        assert_eq!(doc["paths"]["/api/v1/tokens/{id}"]["delete"]["parameters"][0]["schema"]["type"], "string");
        let put = &doc["paths"]["/api/v1/settings/smtp"]["put"];
        assert!(put["responses"]["413"].is_object() && put["responses"]["409"].is_object());
        let schemas = &doc["components"]["schemas"];
        let settings = &schemas["SettingsDoc"];
        assert_eq!(settings["properties"]["port"]["type"], json!(["integer", "null"]));
        assert_eq!(settings["additionalProperties"], false);
        // Answers are typed from the handlers' types: ids are integers, errors have their shape.
        let list = &doc["paths"]["/api/v1/messages"]["get"];
        let answer = &list["responses"]["2XX"]["content"]["application/json"]["schema"];
        assert_eq!(answer["items"]["$ref"], "#/components/schemas/MessageSummary");
        assert_eq!(schemas["MessageSummary"]["properties"]["id"]["type"], "integer");
        assert_eq!(schemas["Error"]["required"], json!(["error"]));
        assert_eq!(list["parameters"][0]["in"], "query", "{list}");
        let delete = &doc["paths"]["/api/v1/templates/{name}"]["delete"]["responses"];
        assert!(delete["204"].is_object() && delete["2XX"].is_null(), "{delete}");
        let count: usize = doc["paths"].as_object().unwrap().values().map(|v| v.as_object().unwrap().len()).sum();
        assert_eq!(count, ROUTES.len());
    }
}
