//! The REST API (`/api/v1/...`) and health endpoints. Handlers only translate HTTP to the
//! shared operations in `panel_service::ops`; nothing is sent inline from a request.

mod answers;
mod auth;
mod automation;
pub mod proxies;
mod routes;
mod server;
mod ui;

pub use auth::openapi;
pub use routes::ROUTES;
pub use server::{ClientAddr, HttpLimits, raise_descriptor_limit};

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use panel_domain::message::Draft;
use panel_domain::settings::patch::Channel;
use panel_domain::{Origin, SettingsDoc};
use panel_service::ops::effective_view;
use panel_service::{ErrorKind, OpsError, Panel};

use crate::auth::{By, SeenBy};
use panel_service::views::{PutOutcome, RetryResult};
use serde::Deserialize;
use serde_json::json;

pub fn router(panel: Panel) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .merge(routes::api_router())
        .merge(ui::routes())
        .route("/api/openapi.json", get(|| async { Json(auth::openapi()) }))
        .layer(axum::middleware::from_fn_with_state(panel.clone(), auth::require_auth))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .layer(axum::middleware::from_fn(announced_size))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(panel)
}

/// The largest request body: room for one message at the size limit (`MAX_BODY_BYTES` of
/// content) written as JSON, whose escapes can double it, or a bulk request of the same size.
pub const MAX_REQUEST_BYTES: usize = 2 * panel_domain::message::MAX_BODY_BYTES + (1 << 20);

fn too_large() -> OpsError {
    OpsError::TooLarge(format!(
        "the request is larger than {} MiB; a message's text, HTML and attachments may be {} MiB",
        MAX_REQUEST_BYTES >> 20,
        panel_domain::message::MAX_BODY_BYTES >> 20
    ))
}

/// A request announcing a body over the limit is answered 413 at once, before anything waits
/// for (or signs in with) a body that will not be read. Bodies without a length are cut off at
/// the same limit while they are read (`DefaultBodyLimit`).
async fn announced_size(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let announced = req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
    if announced.and_then(|v| v.trim().parse::<u64>().ok()).is_some_and(|n| n > MAX_REQUEST_BYTES as u64) {
        return ApiError(too_large()).into_response();
    }
    next.run(req).await
}

/// Headers every answer carries: the UI has no inline script or style and loads nothing from
/// elsewhere, so the policy can be strict; no page may be framed (clickjacking), no type
/// guessed, no address of ours sent to another site in a Referer (same-origin: a stricter
/// no-referrer makes browsers send `Origin: null` with the sign-in form, which is then refused).
async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::http::HeaderValue;
    use axum::http::header;
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

/// Serves until `shutdown` resolves, under `limits` (`server.rs`).
/// Serves the UI and API. `trusted_proxies`: the reverse proxies whose `X-Forwarded-For` names
/// the client (for the sign-in lockout and the per-address limit), none by default.
pub async fn serve(
    panel: Panel,
    listener: tokio::net::TcpListener,
    limits: HttpLimits,
    trusted_proxies: Vec<proxies::Cidr>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(router(panel), listener, limits, trusted_proxies.into(), shutdown).await
}

pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

pub(crate) struct ApiError(OpsError);

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = self.0.kind();
        let status = StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = match &self.0 {
            OpsError::Invalid(errors) => {
                answers::Error { error: "invalid input".into(), fields: Some(errors.clone()), template: None }
            }
            OpsError::Template(e) => {
                answers::Error { error: self.0.to_string(), fields: None, template: serde_json::to_value(e).ok() }
            }
            _ => answers::Error { error: self.0.to_string(), fields: None, template: None },
        };
        if matches!(kind, ErrorKind::Internal | ErrorKind::Unavailable) {
            tracing::error!(error = %self.0, "request failed");
        }
        (status, Json(body)).into_response()
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

/// A JSON request body that must be an object, as every body of this API is: serde would
/// otherwise read an array as the struct's fields in order (`[null, null]` stored a new
/// settings version). Any other body is bad input under `body`.
pub(crate) struct JsonObject<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for JsonObject<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        // As axum's Json: a JSON content type is required (a cross-site form cannot send one).
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json") || t.trim().ends_with("+json"));
        if !json_type {
            return Err(body_error("needs the header Content-Type: application/json".into()));
        }
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|e| match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError(too_large()),
            _ => body_error(e.body_text()),
        })?;
        object(&bytes).map(JsonObject)
    }
}

/// A path parameter, as axum's `Path`, but refused as bad input in the API's JSON error body
/// (`/api/v1/messages/abc`: 400 naming `path`), not in plain text.
pub(crate) struct ApiPath<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> axum::extract::FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(e) => Err(bad_part("path", e.body_text())),
        }
    }
}

/// A query string, as axum's `Query`, but refused as bad input in the API's JSON error body
/// (`?limit=many`: 400 naming `query`), not in plain text.
pub(crate) struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(e) => Err(bad_part("query", e.body_text())),
        }
    }
}

fn body_error(message: String) -> ApiError {
    bad_part("body", message)
}

/// Bad input in one part of the request (`path`, `query`, `body`), answered 400 in JSON.
fn bad_part(part: &str, message: String) -> ApiError {
    let mut errors = panel_domain::FieldErrors::default();
    errors.push(part, message);
    ApiError(OpsError::Invalid(errors))
}

/// `bytes` as the JSON object `T`, parsed once: a body that does not start with `{` is named
/// for what it is instead (the hot path, every enqueue, never builds a `Value`).
fn object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        return serde_json::from_slice(bytes).map_err(|e| body_error(e.to_string()));
    }
    Err(body_error(match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(value) => format!("must be a JSON object ({{\"field\": value, ...}}), not {}", json_kind(&value)),
        Err(e) => format!("is not JSON: {e}"),
    }))
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn ok(value: impl serde::Serialize) -> ApiResult {
    Ok(Json(value).into_response())
}

/// Ready when the database answers, can be written, and its schema is the one this build expects.
async fn ready(State(p): State<Panel>) -> Response {
    let unavailable = |why: String| {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unavailable", "error": why}))).into_response()
    };
    if let Some(f) = p.storage_fault() {
        return unavailable(format!(
            "the database cannot be written since {}: {}",
            f.since.format("%Y-%m-%d %H:%M:%S UTC"),
            f.reason
        ));
    }
    match p.schema_version().await {
        Ok((applied, known)) if applied == known => {
            Json(json!({"status": "ready", "schema_version": applied})).into_response()
        }
        Ok((applied, known)) => {
            unavailable(format!("database schema is at version {applied}, this build needs {known}; run panel migrate"))
        }
        Err(e) => unavailable(e.to_string()),
    }
}

async fn metrics(State(p): State<Panel>) -> ApiResult {
    let text = p.metrics_text().await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

pub(crate) async fn get_settings(State(p): State<Panel>) -> ApiResult {
    let Some(stored) = p.stored_settings().await? else {
        // Nothing to show is "not found" here (a save answers 409 for the same cause).
        let error = answers::Error { error: OpsError::NotConfigured.to_string(), fields: None, template: None };
        return Ok((StatusCode::NOT_FOUND, Json(error)).into_response());
    };
    let effective = p.settings().await?.map(|(_, s)| answers::Effective(effective_view(&s)));
    ok(answers::Settings {
        version: stored.version,
        saved_at: stored.saved_at,
        saved_by: stored.saved_by,
        stored: stored.doc,
        effective,
    })
}

pub(crate) async fn settings_schema() -> Json<answers::SettingsTable> {
    Json(answers::SettingsTable(panel_domain::settings::table::schema()))
}

pub(crate) async fn put_settings(
    State(p): State<Panel>,
    By(by): By,
    JsonObject(body): JsonObject<SettingsDoc>,
) -> ApiResult {
    saved(p.update_settings(&body, &by, Channel::Remote).await?)
}

pub(crate) async fn put_route(
    State(p): State<Panel>,
    By(by): By,
    ApiPath(name): ApiPath<String>,
    JsonObject(body): JsonObject<SettingsDoc>,
) -> ApiResult {
    saved(p.update_route(&name, &body, &by, Channel::Remote).await?)
}

pub(crate) async fn delete_route(State(p): State<Panel>, By(by): By, ApiPath(name): ApiPath<String>) -> ApiResult {
    saved(p.remove_route(&name, &by).await?)
}

/// The answer to a settings save or restore: the version in force, its effective view, notices.
fn saved(update: panel_service::SettingsUpdate) -> ApiResult {
    ok(answers::Saved {
        version: update.version,
        effective: answers::Effective(effective_view(&update.settings)),
        notices: update.notices,
    })
}

#[derive(Deserialize, schemars::JsonSchema)]
pub(crate) struct VersionsQuery {
    limit: Option<usize>,
}

pub(crate) async fn settings_versions(State(p): State<Panel>, ApiQuery(q): ApiQuery<VersionsQuery>) -> ApiResult {
    ok(answers::Versions { versions: p.settings_history(q.limit.unwrap_or(50)).await? })
}

pub(crate) async fn restore_settings(State(p): State<Panel>, By(by): By, ApiPath(version): ApiPath<i64>) -> ApiResult {
    saved(p.restore_settings(version, &by, Channel::Remote).await?)
}

/// Without a body (or with `{}`), checks the saved settings; with fields, the settings as they
/// would be after saving them (the form's unsaved edits), storing nothing. The answer says
/// which (`draft`).
#[derive(Deserialize, Default, schemars::JsonSchema)]
pub(crate) struct BouncesQuery {
    /// Only the reports that matched no message.
    unmatched: Option<bool>,
    /// At most this many, 1-1000 (default 50).
    limit: Option<usize>,
}

pub(crate) async fn bounces(State(p): State<Panel>, ApiQuery(q): ApiQuery<BouncesQuery>) -> ApiResult {
    ok(p.bounces(q.unmatched.unwrap_or(false), q.limit.unwrap_or(50)).await?)
}

#[derive(Deserialize, Default, schemars::JsonSchema)]
pub(crate) struct CheckQuery {
    /// With a body: the standby route the fields are for (default: the primary).
    route: Option<String>,
}

pub(crate) async fn check(
    State(p): State<Panel>,
    axum::Extension(actor): axum::Extension<panel_service::accounts::Actor>,
    ApiQuery(q): ApiQuery<CheckQuery>,
    body: axum::body::Bytes,
) -> ApiResult {
    let patch: SettingsDoc =
        if body.iter().all(u8::is_ascii_whitespace) { SettingsDoc::default() } else { object(&body)? };
    let draft = patch != SettingsDoc::default();
    // A draft can point Panel at any server: as much as a save, which needs an admin.
    if draft && actor.role < panel_service::accounts::Role::Admin {
        return Err(OpsError::Forbidden(
            "checking unsaved settings needs the admin role; an operator checks the saved settings (no body)".into(),
        )
        .into());
    }
    let mut report = match draft {
        true => p.check_draft(q.route.as_deref(), &patch, Channel::Remote).await?,
        false => p.check().await?,
    };
    report.ran_in = "the Panel Service answering this request".into();
    ok(answers::Check { report, draft })
}

#[derive(Deserialize, Default, schemars::JsonSchema)]
pub(crate) struct TestRequest {
    to: Option<String>,
    /// Seconds to wait for the outcome before answering.
    wait: Option<u64>,
}

pub(crate) async fn test_message(State(p): State<Panel>, body: axum::body::Bytes) -> ApiResult {
    // The body is optional: none means the fallback recipient, at once.
    let req: TestRequest =
        if body.iter().all(u8::is_ascii_whitespace) { TestRequest::default() } else { object(&body)? };
    let id = p.enqueue_test(req.to.as_deref()).await?;
    enqueued(&p, id, req.wait).await
}

#[derive(Deserialize, schemars::JsonSchema)]
pub(crate) struct SendRequest {
    #[serde(flatten)]
    draft: Draft,
    wait: Option<u64>,
    /// The same key always yields the same step, however many times it is sent.
    idempotency_key: Option<String>,
}

pub(crate) async fn send_message(
    State(p): State<Panel>,
    SeenBy(seen): SeenBy,
    JsonObject(body): JsonObject<SendRequest>,
) -> ApiResult {
    let (p, req) = (p.as_seen(seen), body);
    let (id, created) = p.enqueue_draft(Origin::MailTester, &req.draft, req.idempotency_key.as_deref()).await?;
    let mut response = enqueued(&p, id, req.wait).await?;
    if !created {
        // Already there: nothing new was accepted.
        *response.status_mut() = StatusCode::OK;
    }
    Ok(response)
}

/// Most messages one bulk request may carry.
const BULK_LIMIT: usize = 1000;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkRequest {
    messages: Vec<Draft>,
}

/// `{"messages": [draft, ...]}`: all stored in one transaction, or none (400 names the index).
pub(crate) async fn send_bulk(
    State(p): State<Panel>,
    SeenBy(seen): SeenBy,
    JsonObject(body): JsonObject<BulkRequest>,
) -> ApiResult {
    let (p, req) = (p.as_seen(seen), body);
    if req.messages.is_empty() || req.messages.len() > BULK_LIMIT {
        let mut errors = panel_domain::FieldErrors::default();
        errors.push("messages", format!("give 1 to {BULK_LIMIT} messages per request"));
        return Err(OpsError::Invalid(errors).into());
    }
    let ids = p.enqueue_drafts(Origin::Dispatch, &req.messages).await?;
    Ok((StatusCode::ACCEPTED, Json(answers::Ids { ids })).into_response())
}

async fn enqueued(p: &Panel, id: i64, wait: Option<u64>) -> ApiResult {
    let running = p.service_running().await?;
    let message = match wait {
        Some(secs) if secs > 0 => Some(p.wait_for(id, Duration::from_secs(secs.min(300))).await?),
        _ => None,
    };
    Ok((StatusCode::ACCEPTED, Json(answers::Enqueued { id, service_running: running, message })).into_response())
}

#[derive(Deserialize, schemars::JsonSchema)]
pub(crate) struct ListQuery {
    state: Option<String>,
    origin: Option<String>,
    recipient: Option<String>,
    since: Option<String>,
    limit: Option<u32>,
}

pub(crate) async fn list_messages(State(p): State<Panel>, ApiQuery(q): ApiQuery<ListQuery>) -> ApiResult {
    let filter = panel_service::ops::message_filter(
        q.state.as_deref(),
        q.origin.as_deref(),
        q.recipient.as_deref(),
        q.since.as_deref(),
        q.limit.unwrap_or(100).min(1000),
    )
    .map_err(OpsError::Invalid)?;
    ok(p.messages(&filter).await?)
}

pub(crate) async fn show_message(State(p): State<Panel>, ApiPath(id): ApiPath<i64>) -> ApiResult {
    ok(p.message(id).await?)
}

/// `message/rfc822`, as a download named after the message.
pub(crate) async fn message_eml(State(p): State<Panel>, ApiPath(id): ApiPath<i64>) -> ApiResult {
    let eml = p.message_eml(id).await?;
    let disposition = format!("attachment; filename=\"panel-message-{id}.eml\"");
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "message/rfc822".to_string()),
            (axum::http::header::CONTENT_DISPOSITION, disposition),
        ],
        eml,
    )
        .into_response())
}

pub(crate) async fn retry_message(State(p): State<Panel>, ApiPath(id): ApiPath<i64>) -> ApiResult {
    match p.retry(id).await? {
        RetryResult::NotFound => Err(OpsError::NotFound(id).into()),
        result @ (RetryResult::NotFailed { .. } | RetryResult::ContentRemoved { .. }) => {
            let error = match result {
                RetryResult::NotFailed { state } => format!(
                    "message {id} is {state}: only a failed or partly failed message, or a retrying one, can be sent again"
                ),
                _ => format!("message {id}'s content was removed by retention: there is nothing to send again"),
            };
            Ok((StatusCode::CONFLICT, Json(answers::RetryConflict { error, result })).into_response())
        }
        r => ok(r),
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkRetry {
    status: String,
    since: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelRequest {
    reason: String,
}

pub(crate) async fn cancel_message(
    State(p): State<Panel>,
    By(by): By,
    ApiPath(id): ApiPath<i64>,
    JsonObject(body): JsonObject<CancelRequest>,
) -> ApiResult {
    let was = p.cancel(id, &by, &body.reason).await?;
    ok(answers::Cancelled { result: "cancelled", was })
}

/// Send now, in bulk: the dead letters (`{"status": "failed", "since": "2h"}`) or every
/// retrying message (`{"status": "retrying"}`).
pub(crate) async fn retry_failed(State(p): State<Panel>, JsonObject(body): JsonObject<BulkRetry>) -> ApiResult {
    let req = body;
    if req.status == "retrying" && req.since.is_none() {
        return ok(answers::Requeued { requeued: p.send_retrying_now().await? });
    }
    if req.status != "failed" {
        let mut errors = panel_domain::FieldErrors::default();
        errors.push("status", "use \"failed\" (failed and partly failed, with an optional since) or \"retrying\"");
        return Err(OpsError::Invalid(errors).into());
    }
    let since = req.since.as_deref().map(panel_service::ops::parse_since).transpose().map_err(OpsError::Invalid)?;
    ok(answers::Requeued { requeued: p.retry_failed(since).await? })
}

pub(crate) async fn services(State(p): State<Panel>) -> ApiResult {
    ok(p.live_services().await?)
}

pub(crate) async fn queue(State(p): State<Panel>) -> ApiResult {
    ok(p.queue().await?)
}

pub(crate) async fn licenses(State(p): State<Panel>) -> ApiResult {
    ok(p.licenses().await?)
}

#[derive(Deserialize, schemars::JsonSchema)]
pub(crate) struct LicenseRequest {
    key: String,
}

pub(crate) async fn add_license(
    State(p): State<Panel>,
    By(by): By,
    JsonObject(body): JsonObject<LicenseRequest>,
) -> ApiResult {
    let req = body;
    let license = p.add_license(&req.key, &by).await?;
    Ok((StatusCode::CREATED, Json(license)).into_response())
}

pub(crate) async fn remove_license(State(p): State<Panel>, By(by): By, ApiPath(id): ApiPath<String>) -> ApiResult {
    p.remove_license(&id, &by).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn credentials(State(p): State<Panel>) -> ApiResult {
    ok(p.credentials().await?)
}

/// Write-only: the secret goes in, and nothing in any answer ever carries it back.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CredentialRequest {
    #[serde(default = "default_kind")]
    kind: String,
    username: Option<String>,
    /// Microsoft: the application (client) id; an alias of `username`.
    client_id: Option<String>,
    tenant: Option<String>,
    #[schemars(with = "String")]
    secret: zeroize::Zeroizing<String>,
}

fn default_kind() -> String {
    "password".into()
}

pub(crate) async fn set_credential(
    State(p): State<Panel>,
    By(by): By,
    ApiPath(name): ApiPath<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    // Parsed here rather than by the Json extractor: serde's messages can quote values, and
    // this body holds a secret. Only the position of a syntax error is reported.
    let req: CredentialRequest = serde_json::from_slice(&body).map_err(|e| {
        let mut errors = panel_domain::FieldErrors::default();
        let what = match e.classify() {
            serde_json::error::Category::Data => "a field is missing, unknown, or of the wrong type",
            _ => "the body is not valid JSON",
        };
        errors.push(
            "body",
            format!(
                "{what} (line {}, column {}); expected {{\"kind\", \"username\", \"tenant\", \"secret\"}}",
                e.line(),
                e.column()
            ),
        );
        OpsError::Invalid(errors)
    })?;
    let kind = panel_domain::CredentialKind::parse(&req.kind).ok_or_else(|| {
        let mut errors = panel_domain::FieldErrors::default();
        errors.push(
            "kind",
            format!(
                "'{}' is not a credential kind; use one of {}",
                req.kind,
                panel_domain::CredentialKind::ALL.join(", ")
            ),
        );
        OpsError::Invalid(errors)
    })?;
    let input = panel_service::CredentialInput {
        name,
        kind,
        username: req.username.or(req.client_id),
        tenant: req.tenant,
        secret: panel_domain::Secret::from(req.secret),
    };
    let outcome = p.set_credential(input, &by).await?;
    let status = if outcome == PutOutcome::Created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(answers::Stored { stored: true, replaced: outcome == PutOutcome::Replaced })).into_response())
}

pub(crate) async fn delete_credential(State(p): State<Panel>, By(by): By, ApiPath(name): ApiPath<String>) -> ApiResult {
    p.delete_credential(&name, &by).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn api_tokens(State(p): State<Panel>) -> ApiResult {
    ok(p.api_tokens(None).await?)
}

pub(crate) async fn revoke_api_token(State(p): State<Panel>, By(by): By, ApiPath(id): ApiPath<String>) -> ApiResult {
    ok(p.revoke_api_token(&id, &by).await?)
}

#[derive(Deserialize, schemars::JsonSchema)]
pub(crate) struct AuditQuery {
    limit: Option<u32>,
}

pub(crate) async fn audit(State(p): State<Panel>, ApiQuery(q): ApiQuery<AuditQuery>) -> ApiResult {
    ok(p.audit_log(q.limit.unwrap_or(100).min(1000)).await?)
}
