//! The API's one route table: each route's method, path, least role, summary and handler. The
//! router, the role check and the OpenAPI document are all made from it, so a route cannot be
//! served without a role or left out of the document.

use axum::Router;
use axum::routing::{MethodFilter, on};
use panel_service::Panel;
use panel_service::accounts::Role;

#[allow(clippy::wildcard_imports)]
use crate::*;
use crate::{answers, automation, ui};
use panel_automation::{DispatchDef, Rendered, ScheduleDef, Template, WorkflowDef};
use panel_domain::SettingsDoc;
use panel_service::views;
use schemars::{Schema, SchemaGenerator};

macro_rules! api_routes {
    ($($method:ident $path:literal => $role:ident, $handler:expr, $answer:ty, $(query $query:ty,)? $(body $body:ty,)? $summary:literal;)+) => {
        /// Every API route: method, path, least role, summary. Requests to API paths not listed
        /// here are answered 404 by the router, after authentication.
        pub const ROUTES: &[(&str, &str, Role, &str)] = &[$((stringify!($method), $path, Role::$role, $summary)),+];

        /// The API routes, each with its handler, exactly as `ROUTES` lists them.
        pub(crate) fn api_router() -> Router<Panel> {
            Router::new()$(.route($path, on(MethodFilter::$method, $handler)))+
        }

        /// Each route's query, body and answer schemas, from the types its handler reads and
        /// writes (`()` answers 204 without a body), in the order of `ROUTES`.
        pub(crate) fn route_schemas(reads: &mut SchemaGenerator, writes: &mut SchemaGenerator) -> Vec<RouteSchemas> {
            vec![$(RouteSchemas {
                query: None $(.or(Some(query_schema::<$query>())))?,
                body: None $(.or(Some(reads.subschema_for::<$body>())))?,
                answer: (std::any::TypeId::of::<$answer>() != std::any::TypeId::of::<()>())
                    .then(|| writes.subschema_for::<$answer>()),
            }),+]
        }
    };
}

/// A query's fields, inline: each becomes a parameter of its own.
fn query_schema<T: schemars::JsonSchema>() -> Schema {
    schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .for_deserialize()
        .into_generator()
        .into_root_schema_for::<T>()
}

pub(crate) struct RouteSchemas {
    pub query: Option<Schema>,
    pub body: Option<Schema>,
    /// None: 204, no body.
    pub answer: Option<Schema>,
}

api_routes! {
    GET "/api/v1/settings/smtp" => Viewer, get_settings, answers::Settings, "The relay settings in force (never a secret)";
    PUT "/api/v1/settings/smtp" => Admin, put_settings, answers::Saved, body SettingsDoc, "Change relay settings (the fields of panel smtp set)";
    GET "/api/v1/settings/smtp/schema" => Viewer, settings_schema, answers::SettingsTable, "The relay settings table: every field's type, label, default, options and the modes that use it";
    GET "/api/v1/settings/smtp/versions" => Viewer, settings_versions, answers::Versions, query VersionsQuery, "Saved relay settings versions, newest first: who, when and what each changed, field by field (?limit, default 50)";
    POST "/api/v1/settings/smtp/versions/{version}/restore" => Admin, restore_settings, answers::Saved, "Make an earlier version the settings in force, as a new version (the same checks as a save)";
    PUT "/api/v1/settings/smtp/routes/{name}" => Admin, put_route, answers::Saved, body SettingsDoc, "Change a standby route's own settings (the relay, credential, TLS and timeouts of panel smtp set --route NAME); a new name adds a route, tried after the others";
    DELETE "/api/v1/settings/smtp/routes/{name}" => Admin, delete_route, answers::Saved, "Remove a standby route";
    POST "/api/v1/smtp/check" => Operator, check, answers::Check, query CheckQuery, body SettingsDoc, "Connect to every route stage by stage; sends nothing. No body (or {}) checks the saved settings; fields check them as they would be saved (admin), for the primary or ?route=NAME";
    POST "/api/v1/smtp/test" => Operator, test_message, answers::Enqueued, body TestRequest, "Enqueue the Test Message ({\"to\", \"wait\"}; no body: the Fallback recipient)";
    GET "/api/v1/messages" => Viewer, list_messages, Vec<views::MessageSummary>, query ListQuery, "The message log (?state, origin, recipient, since, limit)";
    POST "/api/v1/messages" => Operator, send_message, answers::Enqueued, body SendRequest, "Send an ad-hoc message (the mail tester)";
    POST "/api/v1/messages/bulk" => Operator, send_bulk, answers::Ids, body BulkRequest, "Send up to 1,000 messages in one transaction";
    POST "/api/v1/messages/retry" => Operator, retry_failed, answers::Requeued, body BulkRetry, "Send now: failed and partly failed messages to their refused recipients ({\"status\": \"failed\", \"since\"}), or every retrying message ({\"status\": \"retrying\"})";
    GET "/api/v1/messages/{id}" => Viewer, show_message, views::MessageDetail, "A message with every attempt and reply";
    GET "/api/v1/messages/{id}/eml" => Viewer, message_eml, answers::Eml, "The message as an .eml file (message/rfc822): what goes after DATA, or would have, when captured";
    POST "/api/v1/messages/{id}/retry" => Operator, retry_message, views::RetryResult, "Send one message now: a failed or partly failed one to its refused recipients, a retrying one before its retry time";
    POST "/api/v1/messages/{id}/cancel" => Operator, cancel_message, answers::Cancelled, body CancelRequest, "Cancel a message still to be sent ({\"reason\"}): final, never retried; who and why are logged";
    GET "/api/v1/bounces" => Viewer, bounces, Vec<views::Bounce>, query BouncesQuery, "Reports received for the bounce domain, newest first: bounces, delay notices, auto-replies (?unmatched=true: only those that matched no message; ?limit, default 50)";
    GET "/api/v1/services" => Viewer, services, Vec<views::Service>, "Running Panel Services and workers";
    GET "/api/v1/queue" => Viewer, queue, views::QueueStats, "Queue depth and ages";
    GET "/api/v1/dashboard" => Viewer, ui::dashboard_api, views::Dashboard, "Counts per state (last hour, day), per hour, the last relay error";
    GET "/api/v1/licenses" => Viewer, licenses, Vec<views::LicenseStatus>, "License keys with features, expiry and validity";
    POST "/api/v1/licenses" => Admin, add_license, views::License, body LicenseRequest, "Add a license key ({\"key\"})";
    DELETE "/api/v1/licenses/{id}" => Admin, remove_license, (), "Remove a license key";
    GET "/api/v1/credentials" => Viewer, credentials, Vec<panel_service::CredentialInfo>, "Stored credentials (never their secrets)";
    PUT "/api/v1/credentials/{name}" => Admin, set_credential, answers::Stored, body CredentialRequest, "Store or replace a credential (write-only secret)";
    DELETE "/api/v1/credentials/{name}" => Admin, delete_credential, (), "Delete a credential";
    GET "/api/v1/tokens" => Admin, api_tokens, Vec<views::ApiToken>, "API tokens of every account: id, account, label, last use (never a token)";
    DELETE "/api/v1/tokens/{id}" => Admin, revoke_api_token, views::ApiToken, "Revoke an API token; it stops working at once on every service";
    GET "/api/v1/audit" => Viewer, audit, Vec<views::AuditEntry>, query AuditQuery, "The audit log";
    GET "/api/v1/templates" => Viewer, automation::list_templates, Vec<views::Definition>, "Message templates";
    GET "/api/v1/templates/{name}" => Viewer, automation::show_template, Template, "A template";
    PUT "/api/v1/templates/{name}" => Admin, automation::put_template, answers::SavedDefinition, body Template, "Create or replace a template ({\"subject\", \"text\", \"html\"})";
    DELETE "/api/v1/templates/{name}" => Admin, automation::delete_template, (), "Delete a template";
    POST "/api/v1/templates/{name}/render" => Viewer, automation::render_template, Rendered, body answers::Context, "Preview a template against the body as context";
    GET "/api/v1/workflows" => Viewer, automation::list_workflows, Vec<views::Definition>, "Workflows";
    POST "/api/v1/workflows" => Admin, automation::create_workflow, answers::SavedDefinition, body WorkflowDef, "Create a workflow";
    GET "/api/v1/workflows/{name}" => Viewer, automation::show_workflow, views::Definition, "A workflow";
    PUT "/api/v1/workflows/{name}" => Admin, automation::update_workflow, answers::SavedDefinition, body WorkflowDef, "Replace a workflow";
    DELETE "/api/v1/workflows/{name}" => Admin, automation::delete_workflow, (), "Delete a workflow";
    POST "/api/v1/workflows/{name}/enable" => Admin, automation::enable_workflow, views::Definition, "Enable a workflow";
    POST "/api/v1/workflows/{name}/disable" => Admin, automation::disable_workflow, views::Definition, "Disable a workflow";
    GET "/api/v1/workflows/{name}/history" => Viewer, automation::workflow_history, Vec<views::Run>, query automation::Limit, "A workflow's runs";
    GET "/api/v1/schedules" => Viewer, automation::list_schedules, Vec<views::Definition>, "Schedules";
    POST "/api/v1/schedules" => Admin, automation::create_schedule, answers::SavedDefinition, body ScheduleDef, "Create a schedule";
    GET "/api/v1/schedules/{name}" => Viewer, automation::show_schedule, views::Definition, "A schedule";
    PUT "/api/v1/schedules/{name}" => Admin, automation::update_schedule, answers::SavedDefinition, body ScheduleDef, "Replace a schedule";
    DELETE "/api/v1/schedules/{name}" => Admin, automation::delete_schedule, (), "Delete a schedule";
    POST "/api/v1/schedules/{name}/enable" => Admin, automation::enable_schedule, views::Definition, "Enable a schedule";
    POST "/api/v1/schedules/{name}/disable" => Admin, automation::disable_schedule, views::Definition, "Disable a schedule";
    GET "/api/v1/schedules/{name}/history" => Viewer, automation::schedule_history, Vec<views::Run>, query automation::Limit, "A schedule's runs";
    POST "/api/v1/schedules/{name}/run" => Operator, automation::run_schedule, views::Run, "Run a schedule now";
    GET "/api/v1/schedules/{name}/next" => Viewer, automation::schedule_next, views::ScheduleNext, query automation::Count, "A schedule's next fire times (?count)";
    POST "/api/v1/events" => Operator, automation::post_event, answers::Event, body automation::EventRequest, "Post an event to the workflows ({\"type\", \"object\", \"idempotency_key\"})";
    POST "/api/v1/dispatch" => Operator, automation::dispatch, views::Run, body DispatchDef, "Run inline steps now ({\"name\", \"data\", \"steps\"})";
    GET "/api/v1/runs/{id}" => Viewer, automation::show_run, views::Run, "A run: steps, messages and their states";
    GET "/api/v1/me" => Viewer, ui::me, answers::Me, "Who is signed in, with role and CSRF token";
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use panel_domain::Secret;
    use panel_service::SecretsConfig;
    use tower::ServiceExt;

    use super::*;

    /// Every route in the table is served by its handler (the router's own 404 and 405 have no
    /// body), a path outside it is not, and no module registers an API route of its own.
    #[tokio::test]
    async fn the_router_serves_exactly_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("panel.db").display());
        let config = SecretsConfig { authorities: Vec::new(), master_key_file: dir.path().join("master.key") };
        let panel = Panel::open(&url, config).await.unwrap();
        panel
            .put_admin("root", Role::Admin, &Secret::new("a long enough password".into()), false, "test")
            .await
            .unwrap();
        let token = panel.create_api_token("root", "test").await.unwrap();
        let app = crate::router(panel);
        let call = |method: &str, path: String| {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .unwrap();
            let app = app.clone();
            async move {
                let response = app.oneshot(request).await.unwrap();
                let status = response.status();
                (status, response.into_body().collect().await.unwrap().to_bytes())
            }
        };
        for (method, path, _, _) in ROUTES {
            let concrete = path.replace("{id}", "1").replace("{version}", "1").replace("{name}", "x");
            let (status, body) = call(method, concrete).await;
            let routed =
                status != StatusCode::METHOD_NOT_ALLOWED && !(status == StatusCode::NOT_FOUND && body.is_empty());
            assert!(routed, "{method} {path}: {status} without a handler");
        }
        let (status, body) = call("GET", "/api/v1/nothing-here".into()).await;
        assert_eq!((status, body.len()), (StatusCode::NOT_FOUND, 0));

        // Every answer, pages and API alike, carries the security headers.
        let response =
            app.clone().oneshot(Request::builder().uri("/login").body(Body::empty()).unwrap()).await.unwrap();
        let h = response.headers();
        assert!(h["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"));
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "same-origin");

        for (file, source) in [
            ("lib.rs", include_str!("lib.rs")),
            ("ui.rs", include_str!("ui.rs")),
            ("automation.rs", include_str!("automation.rs")),
        ] {
            let outside: Vec<&str> = source.lines().filter(|l| l.contains(".route(\"/api/v1")).collect();
            assert!(outside.is_empty(), "{file} serves API routes outside the table: {outside:?}");
        }
    }

    #[test]
    fn every_route_has_a_role_and_an_openapi_entry() {
        let doc = crate::openapi();
        for (method, path, role, _) in ROUTES {
            let op = &doc["paths"][path][method.to_ascii_lowercase()];
            let description = op["description"].as_str().unwrap_or_default();
            assert!(description.contains(role.as_str()), "{method} {path}: {op}");
        }
    }
}
