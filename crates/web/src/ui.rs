//! The admin web UI: server-rendered pages (minijinja templates compiled into the binary) and
//! one small script that calls the documented REST API for every action. No resource comes from
//! outside the binary.

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::DateTime;
use minijinja::Environment;
use panel_domain::{FieldErrors, MessageState, Origin, Secret};
use panel_service::accounts::{Actor, Role, SESSION_HOURS, SignIn};
use panel_service::ops::effective_view;
use panel_service::views::DefinitionKind;
use panel_service::{OpsError, Panel};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{SESSION_COOKIE, cookie};

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("../ui/base.html")),
    ("login.html", include_str!("../ui/login.html")),
    ("setup.html", include_str!("../ui/setup.html")),
    ("dashboard.html", include_str!("../ui/dashboard.html")),
    ("settings.html", include_str!("../ui/settings.html")),
    ("messages.html", include_str!("../ui/messages.html")),
    ("message.html", include_str!("../ui/message.html")),
    ("definitions.html", include_str!("../ui/definitions.html")),
    ("definition.html", include_str!("../ui/definition.html")),
    ("templates.html", include_str!("../ui/templates.html")),
    ("licenses.html", include_str!("../ui/licenses.html")),
    ("credentials.html", include_str!("../ui/credentials.html")),
    ("tokens.html", include_str!("../ui/tokens.html")),
    ("audit.html", include_str!("../ui/audit.html")),
];

const CSS: &str = include_str!("../ui/static/panel.css");
const JS: &str = include_str!("../ui/static/panel.js");

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        // Hints name the CLI's flags; a page names its fields.
        env.add_filter("form_hint", |hint: String| panel_domain::settings::table::hint_for_form(&hint));
        for (name, source) in TEMPLATES {
            env.add_template(name, source).expect("UI templates compile");
        }
        env
    })
}

pub fn routes() -> Router<Panel> {
    Router::new()
        .route("/", get(dashboard))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/setup/{token}", get(setup_page).post(setup))
        .route("/settings", get(settings))
        .route("/settings/routes/{name}", get(route_settings))
        .route("/messages", get(messages))
        .route("/messages/{id}", get(message))
        .route("/schedules", get(schedules))
        .route("/schedules/{name}", get(schedule))
        .route("/workflows", get(workflows))
        .route("/workflows/{name}", get(workflow))
        .route("/templates", get(templates))
        .route("/licenses", get(licenses))
        .route("/credentials", get(credentials))
        .route("/tokens", get(tokens))
        .route("/audit", get(audit))
        .route("/static/panel.css", get(|| async { ([(header::CONTENT_TYPE, "text/css")], CSS) }))
        .route("/static/panel.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], JS) }))
}

/// A rendered page (boxed: a `Response` is large, and pages travel in `Result`s).
pub(crate) struct Page(Box<Response>);

impl IntoResponse for Page {
    fn into_response(self) -> Response {
        *self.0
    }
}

impl Page {
    fn from_response(r: impl IntoResponse) -> Page {
        Page(Box::new(r.into_response()))
    }
}

impl From<OpsError> for Page {
    fn from(e: OpsError) -> Self {
        let status = StatusCode::from_u16(e.kind().http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Page::from_response(
            (
                status,
                Html(format!(
                    "<!doctype html><title>Panel</title><p>{}</p><p><a href=\"/\">Back</a>",
                    escape(&e.to_string())
                )),
            )
                .into_response(),
        )
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Renders `name` with `ctx` plus who is signed in and what they may do.
async fn render(p: &Panel, name: &str, actor: &Actor, active: &str, mut ctx: Value) -> Result<Page, OpsError> {
    // On every page: a recipient policy that is not plain delivery is never out of sight.
    ctx["policy_notice"] = p.policy_notice().await.into();
    ctx["me"] = json!({
        "name": actor.name,
        "role": actor.role.as_str(),
        "csrf": actor.csrf,
        "operator": actor.role >= Role::Operator,
        "admin": actor.role >= Role::Admin,
    });
    ctx["active"] = active.into();
    ctx["panel_version"] = env!("CARGO_PKG_VERSION").into();
    let html = env()
        .get_template(name)
        .and_then(|t| t.render(&ctx))
        .map_err(|e| OpsError::internal("rendering the page", e))?;
    Ok(Page::from_response(Html(html)))
}

type PageResult = Result<Page, Page>;

// ---- sign-in ----

#[derive(Deserialize)]
pub(crate) struct Next {
    next: Option<String>,
}

fn safe_next(next: Option<&str>) -> String {
    // Only a path on this site: never an absolute or protocol-relative URL. Browsers drop tab,
    // CR and LF from a Location and read a backslash as a slash (`/\t/evil` is `//evil`), so
    // any control character, backslash or second leading slash refuses the whole `next`.
    next.filter(|n| n.starts_with('/') && !n[1..].starts_with('/') && !n.chars().any(|c| c.is_control() || c == '\\'))
        .unwrap_or("/")
        .to_string()
}

async fn login_page(State(p): State<Panel>, Query(q): Query<Next>) -> PageResult {
    let no_admin = p.admins().await?.is_empty();
    login_form(None, safe_next(q.next.as_deref()), no_admin, StatusCode::OK)
}

fn login_form(error: Option<String>, next: String, no_admin: bool, status: StatusCode) -> PageResult {
    let html = env()
        .get_template("login.html")
        .and_then(|t| t.render(json!({"error": error, "next": next, "no_admin": no_admin})))
        .map_err(|e| OpsError::internal("rendering the page", e))?;
    Ok(Page::from_response((status, Html(html))))
}

/// Same-origin check for the sign-in form (there is no session, hence no CSRF token, yet).
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()), host) {
        (None, _) => true,
        (Some(origin), Some(host)) => origin.split_once("://").is_some_and(|(_, h)| h == host),
        (Some(_), None) => false,
    }
}

/// A sign-in form's post: the client's address (behind a trusted proxy, the one it forwarded;
/// else the connection's) and the form's fields.
fn form_post(
    addr: SocketAddr,
    client: Option<axum::Extension<crate::ClientAddr>>,
    body: &[u8],
) -> (std::net::IpAddr, std::collections::HashMap<String, String>) {
    let client = client.map_or(addr.ip(), |c| c.0.0);
    (client, form_urlencoded::parse(body).into_owned().collect())
}

/// Signed in: the session cookie (HttpOnly, SameSite=Strict, Secure behind an https proxy) and
/// on to `to`.
fn signed_in(headers: &HeaderMap, session: &panel_service::accounts::Session, to: &str) -> Page {
    let secure = headers.get("x-forwarded-proto").is_some_and(|v| v.as_bytes() == b"https");
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        session.token,
        SESSION_HOURS * 3600,
        if secure { "; Secure" } else { "" }
    );
    Page::from_response(([(header::SET_COOKIE, cookie)], Redirect::to(to)))
}

async fn login(
    State(p): State<Panel>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    client: Option<axum::Extension<crate::ClientAddr>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> PageResult {
    let (client, form) = form_post(addr, client, &body);
    let name = form.get("name").cloned().unwrap_or_default();
    let next = safe_next(form.get("next").map(String::as_str));
    if !same_origin(&headers) {
        return login_form(
            Some("The sign-in came from another site; use this page.".into()),
            next,
            false,
            StatusCode::FORBIDDEN,
        );
    }
    let password = Secret::new(form.get("password").cloned().unwrap_or_default());
    match p.sign_in(&name, &password, Some(client)).await? {
        SignIn::Blocked { retry_after_secs } => {
            let msg = format!("Too many failed sign-ins. Try again in {} minute(s).", retry_after_secs.div_ceil(60));
            login_form(Some(msg), next, false, StatusCode::TOO_MANY_REQUESTS)
        }
        SignIn::Refused => {
            tracing::warn!(account = %name, %client, "sign-in failed");
            login_form(Some("Wrong name or password.".into()), next, false, StatusCode::UNAUTHORIZED)
        }
        SignIn::Accepted { session, .. } => Ok(signed_in(&headers, &session, &next)),
    }
}

// ---- first run ----

fn setup_form(spent: Option<&str>, name: &str, errors: Option<&FieldErrors>, status: StatusCode) -> PageResult {
    let ctx = json!({
        "spent": spent,
        "name": name,
        "errors": errors,
        "min_chars": panel_service::accounts::MIN_PASSWORD_CHARS,
    });
    let html = env()
        .get_template("setup.html")
        .and_then(|t| t.render(ctx))
        .map_err(|e| OpsError::internal("rendering the page", e))?;
    Ok(Page::from_response((status, Html(html))))
}

/// The setup link `panel serve` printed on its first start: a form for the first admin.
async fn setup_page(State(p): State<Panel>, Path(token): Path<String>) -> PageResult {
    if !p.setup_open(&token).await? {
        return setup_form(Some(panel_service::accounts::SETUP_LINK_SPENT), "", None, StatusCode::NOT_FOUND);
    }
    setup_form(None, "", None, StatusCode::OK)
}

/// Makes the first admin, signs it in and opens the relay settings, where a new installation
/// starts. Bad input is shown on the same page, and the link keeps working for the correction.
async fn setup(
    State(p): State<Panel>,
    Path(token): Path<String>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    client: Option<axum::Extension<crate::ClientAddr>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> PageResult {
    let (client, form) = form_post(addr, client, &body);
    let name = form.get("name").cloned().unwrap_or_default();
    if !same_origin(&headers) {
        return setup_form(Some("The form came from another site; use the link."), &name, None, StatusCode::FORBIDDEN);
    }
    let password = Secret::new(form.get("password").cloned().unwrap_or_default());
    if form.get("confirm").map(String::as_str) != Some(password.expose()) {
        let mut errors = FieldErrors::default();
        errors.push("password", "the two passwords differ");
        return setup_form(None, &name, Some(&errors), StatusCode::BAD_REQUEST);
    }
    match p.finish_setup(&token, &name, &password, Some(client)).await {
        Ok(SignIn::Accepted { session, .. }) => {
            tracing::info!(account = %name.trim().to_ascii_lowercase(), %client, "the first admin was created with the setup link");
            Ok(signed_in(&headers, &session, "/settings"))
        }
        // Made, but signing in did not go through (it cannot be refused; blocked, at most):
        // the sign-in page takes it from here.
        Ok(_) => Ok(Page::from_response(Redirect::to("/login"))),
        Err(OpsError::Invalid(errors)) => setup_form(None, &name, Some(&errors), StatusCode::BAD_REQUEST),
        Err(e @ (OpsError::Forbidden(_) | OpsError::Conflict(_))) => setup_form(
            Some(&e.to_string()),
            "",
            None,
            StatusCode::from_u16(e.kind().http_status()).unwrap_or(StatusCode::CONFLICT),
        ),
        Err(e) => Err(e.into()),
    }
}

/// Sign-out is a form post: its CSRF token comes in the body.
async fn logout(
    State(p): State<Panel>,
    Extension(actor): Extension<Actor>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> PageResult {
    let form: std::collections::HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    if actor.csrf.is_none() || form.get("csrf") != actor.csrf.as_ref() {
        return Err(Page::from_response((StatusCode::FORBIDDEN, "missing or wrong CSRF token")));
    }
    if let Some(token) = cookie(&headers, SESSION_COOKIE) {
        p.sign_out(&token).await?;
    }
    let clear = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    Ok(Page::from_response(([(header::SET_COOKIE, clear)], Redirect::to("/login"))))
}

pub(crate) async fn me(Extension(actor): Extension<Actor>) -> Response {
    axum::Json(crate::answers::Me { name: actor.name, role: actor.role.as_str().into(), csrf: actor.csrf })
        .into_response()
}

// ---- dashboard ----

/// What the dashboard shows (the service's typed view), as the page template reads it.
async fn dashboard_data(p: &Panel) -> Result<Value, OpsError> {
    Ok(serde_json::to_value(p.dashboard().await?).expect("the dashboard serializes"))
}

pub(crate) async fn dashboard_api(State(p): State<Panel>) -> Response {
    match dashboard_data(&p).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({"error": e.to_string()}))).into_response(),
    }
}

/// Delivered, retrying and failed per hour as stacked bars, drawn on the server.
fn chart_svg(hours: &[Value]) -> String {
    let (w, h, bar) = (720.0, 160.0, 24.0);
    let max = hours
        .iter()
        .map(|v| {
            ["delivered", "retrying", "partly_failed", "failed"].iter().map(|k| v[k].as_i64().unwrap_or(0)).sum::<i64>()
        })
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let mut svg = format!(
        r#"<svg viewBox="0 0 {w} {} " role="img" aria-label="Messages per hour over the last day" class="chart">"#,
        h + 20.0
    );
    for (i, v) in hours.iter().enumerate() {
        let x = i as f64 * (w / 24.0) + 3.0;
        let mut y = h;
        for (key, class) in [("delivered", "ok"), ("retrying", "warn"), ("partly_failed", "partial"), ("failed", "bad")]
        {
            let n = v[key].as_i64().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let height = n as f64 / max * (h - 10.0);
            y -= height;
            svg.push_str(&format!(
                r#"<rect class="{class}" x="{x:.1}" y="{y:.1}" width="{bar}" height="{height:.1}"><title>{n} {key}</title></rect>"#
            ));
        }
        if i % 3 == 0 {
            let label = v["hour"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.format("%H:00").to_string())
                .unwrap_or_default();
            svg.push_str(&format!(r#"<text x="{x:.1}" y="{}">{label}</text>"#, h + 15.0));
        }
    }
    svg.push_str(&format!(r#"<text x="0" y="10">max {max}/h (UTC)</text></svg>"#));
    svg
}

async fn dashboard(State(p): State<Panel>, Extension(actor): Extension<Actor>) -> PageResult {
    let d = dashboard_data(&p).await?;
    let chart = chart_svg(d["hours"].as_array().map(Vec::as_slice).unwrap_or_default());
    Ok(render(&p, "dashboard.html", &actor, "dashboard", json!({"d": d, "chart": chart})).await?)
}

// ---- relay settings ----

async fn settings(State(p): State<Panel>, Extension(actor): Extension<Actor>) -> PageResult {
    settings_page(&p, &actor, None).await
}

async fn route_settings(
    State(p): State<Panel>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
) -> PageResult {
    settings_page(&p, &actor, Some(name)).await
}

/// The settings form: the main settings, or a standby route's own (`route`; a name not saved
/// yet shows an empty form that saving makes the route).
async fn settings_page(p: &Panel, actor: &Actor, route: Option<String>) -> PageResult {
    if let Some(name) = &route {
        panel_domain::settings::check_route_name("route", name)
            .map_err(|e| OpsError::Invalid(panel_domain::FieldErrors(vec![e])))?;
    }
    let stored = p.stored_settings().await?;
    let settings = p.settings().await.ok().flatten().map(|(_, s)| s);
    let routes: Vec<_> = stored.iter().flat_map(|s| s.doc.routes.iter().flatten().cloned()).collect();
    let (doc, effective) = match &route {
        None => (stored.as_ref().map(|s| s.doc.clone()), settings.as_ref().map(effective_view)),
        Some(name) => (
            routes.iter().find(|r| &r.name == name).map(|r| r.settings.clone()),
            settings.iter().flat_map(|s| &s.standby).find(|r| &r.name == name).map(|r| effective_view(&r.settings)),
        ),
    };
    // Names only, for the credential field's suggestions (never a secret).
    let credentials = p.credentials().await.unwrap_or_default();
    let names: Vec<String> = credentials.iter().map(|c| c.name.clone()).collect();
    let history = p.settings_history(20).await?;
    Ok(render(
        p,
        "settings.html",
        actor,
        "settings",
        json!({
            "stored": doc,
            "route": route,
            "routes": routes,
            "version": stored.as_ref().map(|s| s.version),
            "saved_by": stored.as_ref().map(|s| &s.saved_by),
            "effective": effective,
            "credentials": names,
            "schema": panel_domain::settings::table::schema(),
            "history": history,
        }),
    )
    .await?)
}

// ---- messages ----

#[derive(Deserialize)]
pub(crate) struct MessageQuery {
    state: Option<String>,
    origin: Option<String>,
    recipient: Option<String>,
    since: Option<String>,
}

async fn messages(
    State(p): State<Panel>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<MessageQuery>,
) -> PageResult {
    let parsed = panel_service::ops::message_filter(
        q.state.as_deref(),
        q.origin.as_deref(),
        q.recipient.as_deref(),
        q.since.as_deref(),
        200,
    );
    let error = parsed.as_ref().err().map(|e| e.to_string());
    // A filter that does not parse lists nothing, next to its error; never everything.
    let list = match parsed {
        Ok(filter) => p.messages(&filter).await?,
        Err(_) => Vec::new(),
    };
    Ok(render(
        &p,
        "messages.html",
        &actor,
        "messages",
        json!({
            "list": list,
            "q": {"state": q.state, "origin": q.origin, "recipient": q.recipient, "since": q.since},
            "states": MessageState::ALL,
            "origins": Origin::ALL,
            "error": error,
        }),
    )
    .await?)
}

async fn message(State(p): State<Panel>, Extension(actor): Extension<Actor>, Path(id): Path<i64>) -> PageResult {
    let m = p.message(id).await?;
    let content = p.message_content(id).await?;
    Ok(render(&p, "message.html", &actor, "messages", json!({"m": m, "content": content})).await?)
}

// ---- schedules, workflows, templates ----

async fn definitions_page(p: &Panel, actor: &Actor, kind: DefinitionKind) -> PageResult {
    let rows = p.definitions(kind).await?;
    Ok(render(p, "definitions.html", actor, kind.as_str(), json!({"kind": kind.as_str(), "rows": rows})).await?)
}

async fn definition_page(p: &Panel, actor: &Actor, kind: DefinitionKind, name: &str) -> PageResult {
    let row = p.definition(kind, name).await?;
    let history = p.history(kind.as_str(), name, 20).await?;
    let next = match kind {
        DefinitionKind::Schedule => p.schedule_next(name, 5).await.map(|n| n.next).unwrap_or_default(),
        _ => vec![],
    };
    let doc = serde_json::to_string_pretty(&row.doc).unwrap_or_default();
    Ok(render(
        p,
        "definition.html",
        actor,
        kind.as_str(),
        json!({"kind": kind.as_str(), "row": row, "doc": doc, "history": history, "next": next}),
    )
    .await?)
}

async fn schedules(State(p): State<Panel>, Extension(actor): Extension<Actor>) -> PageResult {
    definitions_page(&p, &actor, DefinitionKind::Schedule).await
}

async fn schedule(State(p): State<Panel>, Extension(actor): Extension<Actor>, Path(name): Path<String>) -> PageResult {
    definition_page(&p, &actor, DefinitionKind::Schedule, &name).await
}

async fn workflows(State(p): State<Panel>, Extension(actor): Extension<Actor>) -> PageResult {
    definitions_page(&p, &actor, DefinitionKind::Workflow).await
}

async fn workflow(State(p): State<Panel>, Extension(actor): Extension<Actor>, Path(name): Path<String>) -> PageResult {
    definition_page(&p, &actor, DefinitionKind::Workflow, &name).await
}

async fn templates(State(p): State<Panel>, Extension(actor): Extension<Actor>) -> PageResult {
    let rows = p.definitions(DefinitionKind::Template).await?;
    Ok(render(&p, "templates.html", &actor, "template", json!({"rows": rows})).await?)
}

// ---- licenses, credentials, audit ----

async fn licenses(State(p): State<Panel>, Extension(actor): Extension<Actor>) -> PageResult {
    let list = p.licenses().await?;
    Ok(render(&p, "licenses.html", &actor, "licenses", json!({"list": list})).await?)
}

async fn credentials(State(p): State<Panel>, Extension(actor): Extension<Actor>) -> PageResult {
    let list = p.credentials().await?;
    Ok(render(&p, "credentials.html", &actor, "credentials", json!({"list": list})).await?)
}

/// API tokens are listed to admins only, as the API does.
async fn tokens(State(p): State<Panel>, Extension(actor): Extension<Actor>) -> PageResult {
    let list = if actor.role >= Role::Admin { Some(p.api_tokens(None).await?) } else { None };
    Ok(render(&p, "tokens.html", &actor, "tokens", json!({"list": list})).await?)
}

async fn audit(State(p): State<Panel>, Extension(actor): Extension<Actor>) -> PageResult {
    let list = p.audit_log(200).await?;
    Ok(render(&p, "audit.html", &actor, "audit", json!({"list": list})).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_template_compiles() {
        for (name, _) in TEMPLATES {
            env().get_template(name).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }

    #[test]
    fn the_chart_draws_a_bar_per_state_and_hour() {
        let hours: Vec<Value> = (0..24)
            .map(|i| json!({"hour": "2026-11-26T00:00:00Z", "delivered": i, "retrying": 1, "failed": 0}))
            .collect();
        let svg = chart_svg(&hours);
        assert_eq!(svg.matches("class=\"ok\"").count(), 23, "hour 0 delivered none");
        assert_eq!(svg.matches("class=\"warn\"").count(), 24);
        assert!(!svg.contains("class=\"bad\""));
    }

    #[test]
    fn sign_in_redirects_only_within_the_site() {
        assert_eq!(safe_next(Some("/messages?state=failed")), "/messages?state=failed");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        // What a browser reads as //evil.example once it drops tab, CR and LF.
        for bad in ["/\t/evil.example", "/\n/evil.example", "/\r/evil.example", "/\u{b}/evil.example", "/\\evil"] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_next(None), "/");
    }
}
