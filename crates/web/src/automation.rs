//! `/api/v1/templates`, `/workflows`, `/schedules`, `/events`, `/dispatch` and `/runs`: the same
//! operations as `panel template|workflow|schedule|event|dispatch|run`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use panel_automation::{DispatchDef, ScheduleDef, Template, WorkflowDef};
use panel_service::Panel;
use panel_service::views::{DefinitionKind, SaveMode, SaveOutcome};
use serde::Deserialize;
use serde_json::Value;

use crate::auth::{By, SeenBy};
use crate::{ApiPath, ApiQuery, ApiResult, JsonObject, ok};

fn saved(outcome: SaveOutcome, name: &str) -> ApiResult {
    let status = if outcome == SaveOutcome::Created { StatusCode::CREATED } else { StatusCode::OK };
    let outcome = format!("{outcome:?}").to_lowercase();
    Ok((status, Json(crate::answers::SavedDefinition { name: name.to_string(), outcome })).into_response())
}

pub(crate) async fn list_templates(State(p): State<Panel>) -> ApiResult {
    ok(p.definitions(DefinitionKind::Template).await?)
}

pub(crate) async fn show_template(State(p): State<Panel>, ApiPath(name): ApiPath<String>) -> ApiResult {
    ok(p.template(&name).await?)
}

pub(crate) async fn put_template(
    State(p): State<Panel>,
    By(by): By,
    ApiPath(name): ApiPath<String>,
    JsonObject(body): JsonObject<Template>,
) -> ApiResult {
    let t = body;
    saved(p.save_template(&name, &t, SaveMode::Upsert, &by).await?, &name)
}

pub(crate) async fn delete_template(State(p): State<Panel>, By(by): By, ApiPath(name): ApiPath<String>) -> ApiResult {
    p.delete_definition(DefinitionKind::Template, &name, &by).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Body: the context (`{"object": {...}}`); answers the rendered subject, text and HTML.
pub(crate) async fn render_template(
    State(p): State<Panel>,
    ApiPath(name): ApiPath<String>,
    JsonObject(body): JsonObject<Value>,
) -> ApiResult {
    let data = body;
    ok(p.render_template(&name, &data).await?)
}

macro_rules! definition_routes {
    ($kind:expr, $def:ty, $save:ident, $list:ident, $show:ident, $create:ident, $update:ident, $delete:ident,
     $enable:ident, $disable:ident, $history:ident) => {
        pub(crate) async fn $list(State(p): State<Panel>) -> ApiResult {
            ok(p.definitions($kind).await?)
        }

        pub(crate) async fn $show(State(p): State<Panel>, ApiPath(name): ApiPath<String>) -> ApiResult {
            ok(p.definition($kind, &name).await?)
        }

        pub(crate) async fn $create(
            State(p): State<Panel>,
            By(by): By,
            JsonObject(body): JsonObject<$def>,
        ) -> ApiResult {
            let def = body;
            saved(p.$save(&def, SaveMode::Create, &by).await?, &def.name)
        }

        /// The body's name must be the path's.
        pub(crate) async fn $update(
            State(p): State<Panel>,
            By(by): By,
            ApiPath(name): ApiPath<String>,
            JsonObject(body): JsonObject<$def>,
        ) -> ApiResult {
            let def = body;
            if def.name != name {
                let mut errors = panel_domain::FieldErrors::default();
                errors.push("name", format!("the body names '{}' but the path '{name}'", def.name));
                return Err(panel_service::OpsError::Invalid(errors).into());
            }
            saved(p.$save(&def, SaveMode::Update, &by).await?, &name)
        }

        pub(crate) async fn $delete(State(p): State<Panel>, By(by): By, ApiPath(name): ApiPath<String>) -> ApiResult {
            p.delete_definition($kind, &name, &by).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }

        pub(crate) async fn $enable(State(p): State<Panel>, By(by): By, ApiPath(name): ApiPath<String>) -> ApiResult {
            p.set_enabled($kind, &name, true, &by).await?;
            ok(p.definition($kind, &name).await?)
        }

        pub(crate) async fn $disable(State(p): State<Panel>, By(by): By, ApiPath(name): ApiPath<String>) -> ApiResult {
            p.set_enabled($kind, &name, false, &by).await?;
            ok(p.definition($kind, &name).await?)
        }

        pub(crate) async fn $history(
            State(p): State<Panel>,
            ApiPath(name): ApiPath<String>,
            ApiQuery(q): ApiQuery<Limit>,
        ) -> ApiResult {
            p.definition($kind, &name).await?;
            ok(p.history($kind.as_str(), &name, q.limit.unwrap_or(20).min(1000)).await?)
        }
    };
}

#[derive(Deserialize, schemars::JsonSchema)]
pub(crate) struct Limit {
    limit: Option<u32>,
}

definition_routes!(
    DefinitionKind::Workflow,
    WorkflowDef,
    save_workflow,
    list_workflows,
    show_workflow,
    create_workflow,
    update_workflow,
    delete_workflow,
    enable_workflow,
    disable_workflow,
    workflow_history
);

definition_routes!(
    DefinitionKind::Schedule,
    ScheduleDef,
    save_schedule,
    list_schedules,
    show_schedule,
    create_schedule,
    update_schedule,
    delete_schedule,
    enable_schedule,
    disable_schedule,
    schedule_history
);

pub(crate) async fn run_schedule(State(p): State<Panel>, By(by): By, ApiPath(name): ApiPath<String>) -> ApiResult {
    let run = p.run_schedule(&name, &by).await?;
    Ok((StatusCode::ACCEPTED, Json(run)).into_response())
}

#[derive(Deserialize, schemars::JsonSchema)]
pub(crate) struct Count {
    count: Option<usize>,
}

pub(crate) async fn schedule_next(
    State(p): State<Panel>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<Count>,
) -> ApiResult {
    ok(p.schedule_next(&name, q.count.unwrap_or(5)).await?)
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventRequest {
    #[serde(rename = "type")]
    event_type: String,
    /// The directory object the event is about (a JSON object).
    #[schemars(with = "serde_json::Map<String, Value>")]
    object: Value,
    idempotency_key: Option<String>,
}

/// 202 with the event id and its workflow runs; 200 when the idempotency key was seen before.
pub(crate) async fn post_event(
    State(p): State<Panel>,
    By(by): By,
    SeenBy(seen): SeenBy,
    JsonObject(body): JsonObject<EventRequest>,
) -> ApiResult {
    let (p, req) = (p.as_seen(seen), body);
    let event = p.post_event(&req.event_type, &req.object, req.idempotency_key.as_deref(), &by).await?;
    let status = if event.created { StatusCode::ACCEPTED } else { StatusCode::OK };
    let answer = crate::answers::Event { event_id: event.id, created: event.created, runs: event.runs };
    Ok((status, Json(answer)).into_response())
}

pub(crate) async fn dispatch(
    State(p): State<Panel>,
    By(by): By,
    JsonObject(body): JsonObject<DispatchDef>,
) -> ApiResult {
    let def = body;
    let run = p.dispatch(&def, &by).await?;
    Ok((StatusCode::ACCEPTED, Json(run)).into_response())
}

pub(crate) async fn show_run(State(p): State<Panel>, ApiPath(id): ApiPath<i64>) -> ApiResult {
    ok(p.run(id).await?)
}
