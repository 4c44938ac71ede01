//! The admin web UI in Debian's headless Chromium, against a real `panel serve` and the private
//! Postfix lab: sign in, configure the relay, check it, send the Test Message; roles and CSRF.
//! Screenshots of the main pages go to target/screenshots/ (test artifacts, not committed).

use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;
use panel_testlab::Browser;

const WAIT: Duration = Duration::from_secs(30);

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots")
}

pub(crate) fn account(env: &Env, name: &str, role: &str) {
    let r = env.panel_stdin(&["admin", "create", name, "--role", role, "--password-stdin"], ADMIN_PASSWORD);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

pub(crate) fn sign_in(b: &Browser, port: u16, name: &str) {
    b.goto(&format!("http://127.0.0.1:{port}/settings"));
    b.find("#name");
    assert!(b.url().contains("/login?next=%2Fsettings"), "a page needs sign-in first: {}", b.url());
    b.fill("#name", name);
    b.fill("#password", ADMIN_PASSWORD);
    b.click(&b.find("#sign-in"));
    b.wait_text("#who", 20, |t| t.contains(name));
}

#[test]
fn an_admin_signs_in_configures_the_relay_checks_it_and_sends_a_test_message() {
    let Some(lab) = PostfixLab::start() else { return };
    let Some(b) = Browser::start() else { return };
    let mut env = Env::new();
    account(&env, "ann", "admin");
    let port = env.serve();
    sign_in(&b, port, "ann");
    assert!(b.url().ends_with("/settings"), "back where sign-in started: {}", b.url());
    let text = b.page_text();
    assert!(text.contains("Not configured yet"), "{text}");

    b.fill("#f-host", "127.0.0.1");
    b.select("#f-security", "none");
    let placeholder = b.script("return document.getElementById('f-port').placeholder");
    assert_eq!(placeholder, "25", "the default port follows the security mode");
    // Only the fields of the chosen modes are shown: none of TLS with security none, none of a
    // password with auth none (the default); choosing password shows its fields.
    let hidden = |id: &str| {
        b.script(&format!("return document.getElementById('{id}').closest('.field').hidden")) == serde_json::json!(true)
    };
    assert!(hidden("f-ca_file") && hidden("f-username") && hidden("f-token_endpoint"), "mode fields shown");
    assert!(!hidden("f-host") && !hidden("f-from"));
    b.select("#f-auth", "password");
    assert!(!hidden("f-username") && !hidden("f-credential") && hidden("f-keytab"), "password fields hidden");
    b.select("#f-auth", "none");
    b.fill("#f-port", &lab.plain_port.to_string());
    b.fill("#f-from", "not an address");
    b.fill("#f-fallback_recipient", "ops@example.org");
    b.click(&b.find("#save"));
    let error = b.wait_text("[data-error-for=from]", 10, |t| !t.is_empty());
    assert!(error.contains("address"), "the error is shown at its field: {error}");
    b.fill("#f-from", "Identity Panel <panel@example.org>");
    b.click(&b.find("#save"));
    b.wait_text("main > p", 10, |t| t.contains("Version 1"));
    assert!(b.page_text().contains(&format!("127.0.0.1:{}", lab.plain_port)), "the settings in force are shown");

    b.click(&b.find("#check"));
    let stages = b.wait_text("#check-stages", 20, |t| t.contains("quit"));
    for stage in ["tcp", "greeting", "ehlo", "mail", "rcpt"] {
        assert!(stages.contains(stage), "{stage} in {stages}");
    }
    assert!(b.page_text().contains("would accept a message"));

    b.click(&b.find("#test-message"));
    let status = b.wait_text("#test-status", 40, |t| t.starts_with("delivered") || t.contains("failed"));
    assert!(status.starts_with("delivered") && status.contains("250"), "{status}");
    assert_eq!(lab.wait_for_messages("Subject: Panel test message", 1, WAIT).len(), 1, "the message is in the Maildir");
    b.screenshot(&screenshots().join("settings.png"));

    b.goto(&format!("http://127.0.0.1:{port}/messages"));
    let table = b.wait_text("#messages", 10, |t| t.contains("test_message"));
    assert!(table.contains("delivered"), "{table}");
    b.screenshot(&screenshots().join("messages.png"));
    b.click(&b.find("#messages a"));
    let attempts = b.wait_text("#attempts", 10, |t| t.contains("250"));
    assert!(attempts.contains("delivered"), "{attempts}");
    b.screenshot(&screenshots().join("message.png"));

    b.goto(&format!("http://127.0.0.1:{port}/"));
    b.wait_text("main", 10, |t| t.contains("Last hour") && t.contains("1 delivered"));
    assert!(b.try_find("svg.chart rect.ok").is_some(), "the chart shows the delivered message");
    b.screenshot(&screenshots().join("dashboard.png"));
}

#[test]
fn a_wrong_password_shows_the_relays_535_and_the_hint() {
    let Some(lab) = PostfixLab::start() else { return };
    let Some(b) = Browser::start() else { return };
    let mut env = Env::new();
    let pw = env.password_args("wrong-password");
    let pw: Vec<&str> = pw.iter().map(String::as_str).collect();
    env.configure(&lab, lab.submission_port, "starttls", &pw);
    account(&env, "ann", "operator");
    let port = env.serve();
    sign_in(&b, port, "ann");
    assert!(b.try_find("#save").is_none(), "an operator cannot save settings");
    b.click(&b.find("#test-message"));
    let status = b.wait_text("#test-status", 40, |t| t.starts_with("failed") || t.starts_with("delivered"));
    assert!(status.starts_with("failed") && status.contains("auth") && status.contains("535"), "{status}");
    assert!(status.contains("Hint:"), "{status}");
    b.screenshot(&screenshots().join("settings-auth-failed.png"));
    b.goto(&format!("http://127.0.0.1:{port}/"));
    let banner = b.wait_text("#banner", 10, |t| !t.is_empty());
    assert!(banner.contains("configuration error") && banner.contains("auth"), "{banner}");
}

#[test]
fn an_operator_sends_a_retrying_message_now_then_cancels_it_from_its_page() {
    let Some(b) = Browser::start() else { return };
    let mut env = Env::new();
    // Nothing listens on the relay port: every attempt fails and waits an hour.
    env.relay_on(panel_testlab::free_port(), &["--retry-schedule", "1h"]);
    account(&env, "ann", "operator");
    let port = env.serve();
    let id = id_of(&env.ok(&["send", "--to", "bo@example.org", "--subject", "From the page", "--text", "x", "--json"]));
    env.wait_message(id, WAIT, |m| m["state"] == "retrying");
    sign_in(&b, port, "ann");
    b.goto(&format!("http://127.0.0.1:{port}/messages/{id}"));
    b.click(&b.find("#send-now"));
    // Tried again at once, not in an hour.
    env.wait_message(id, WAIT, |m| m["state"] == "retrying" && m["attempts"].as_array().unwrap().len() == 2);

    b.goto(&format!("http://127.0.0.1:{port}/messages/{id}"));
    b.fill("#cancel-reason", "bo left the company");
    b.script("window.confirm = () => true; return 1");
    b.click(&b.find("#cancel"));
    b.wait_text("#state", 20, |t| t == "cancelled");
    let page = b.wait_text("main", 10, |t| t.contains("cancelled by"));
    assert!(page.contains("cancelled by admin:ann: bo left the company"), "who and why: {page}");
    assert!(page.contains("cancelled (not sent)"), "the recipient shows it: {page}");
    assert!(b.try_find("#cancel").is_none() && b.try_find("#send-now").is_none(), "nothing left to do");
}

#[test]
fn a_viewer_cannot_save_settings_in_the_page_or_through_the_api() {
    let Some(b) = Browser::start() else { return };
    let mut env = Env::new();
    env.relay_on(2525, &[]);
    account(&env, "vic", "viewer");
    let port = env.serve();
    sign_in(&b, port, "vic");
    assert!(b.try_find("#save").is_none(), "no Save button for a viewer");
    assert!(b.try_find("#test-message").is_none(), "no Test Message for a viewer");
    assert_eq!(b.script("return document.getElementById('f-host').readOnly"), true);
    // The API refuses the same change from the viewer's own session, CSRF token and all.
    let refused = b.script(
        "const x = new XMLHttpRequest(); x.open('PUT', '/api/v1/settings/smtp', false);
         x.setRequestHeader('Content-Type', 'application/json');
         x.setRequestHeader('X-CSRF-Token', document.querySelector('meta[name=csrf]').content);
         x.send(JSON.stringify({host: 'evil.example'})); return [x.status, x.responseText];",
    );
    assert_eq!(refused[0], 403, "{refused}");
    assert!(refused[1].as_str().unwrap().contains("viewer"), "{refused}");
    assert!(env.ok(&["smtp", "show", "--json"]).stdout.contains("127.0.0.1"), "nothing changed");
}

/// Signs in over HTTP; returns the session cookie and its CSRF token.
pub(crate) fn session(port: u16, name: &str, password: &str) -> Result<(String, String), u16> {
    let body = format!("name={name}&password={password}&next=%2F");
    let (status, head, _) = http_with(port, "POST", "/login", "", &body);
    if status != 303 {
        return Err(status);
    }
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: ").or_else(|| l.strip_prefix("Set-Cookie: ")))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string();
    assert!(head.to_ascii_lowercase().contains("httponly") && head.contains("SameSite=Strict"), "{head}");
    let (_, _, me) = http_with(port, "GET", "/api/v1/me", &format!("Cookie: {cookie}\r\n"), "");
    let me: serde_json::Value = serde_json::from_str(&me).unwrap();
    Ok((cookie, me["csrf"].as_str().unwrap().to_string()))
}

#[test]
fn sessions_need_csrf_tokens_tokens_need_roles_and_sign_in_is_rate_limited() {
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &[]);
    account(&env, "ann", "admin");
    let port = env.serve();

    let (status, _, body) = http_with(port, "GET", "/api/v1/messages", "", "");
    assert_eq!(status, 401, "{body}");
    let (status, head, _) = http_with(port, "GET", "/messages", "", "");
    assert_eq!(status, 303);
    assert!(head.to_ascii_lowercase().contains("location: /login?next=%2fmessages"), "{head}");
    assert_eq!(http_with(port, "GET", "/healthz", "", "").0, 200, "health stays open");
    let (status, _, openapi) = http_with(port, "GET", "/api/openapi.json", "", "");
    assert_eq!(status, 200);
    assert!(openapi.contains("/api/v1/smtp/test") && openapi.contains("\"openapi\":\"3.1.0\""), "{openapi}");

    let (cookie, csrf) = session(port, "ann", ADMIN_PASSWORD).unwrap();
    let with_cookie = format!("Cookie: {cookie}\r\n");
    let (status, _, body) = http_with(port, "POST", "/api/v1/smtp/test", &with_cookie, "{}");
    assert_eq!(status, 403, "a session request without its CSRF token is refused: {body}");
    assert!(body.contains("CSRF"), "{body}");
    let (status, _, _) =
        http_with(port, "POST", "/api/v1/smtp/test", &format!("{with_cookie}X-CSRF-Token: wrong\r\n"), "{}");
    assert_eq!(status, 403);
    let (status, _, body) =
        http_with(port, "POST", "/api/v1/smtp/test", &format!("{with_cookie}X-CSRF-Token: {csrf}\r\n"), "{}");
    assert_eq!(status, 202, "{body}");
    let (status, _, _) = http_with(port, "POST", "/logout", &with_cookie, "csrf=wrong");
    assert_eq!(status, 403, "sign-out needs the token too");
    let (status, _, _) = http_with(port, "POST", "/logout", &with_cookie, &format!("csrf={csrf}"));
    assert_eq!(status, 303);
    assert_eq!(http_with(port, "GET", "/api/v1/me", &with_cookie, "").0, 401, "the session ended");

    let viewer = env.api_token("vic", "viewer");
    let bearer = format!("Authorization: Bearer {viewer}\r\n");
    assert_eq!(http_with(port, "GET", "/api/v1/messages", &bearer, "").0, 200);
    let (status, _, body) = http_with(port, "POST", "/api/v1/smtp/test", &bearer, "{}");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("needs operator"), "{body}");
    let audit = env.ok(&["audit", "list", "--json"]).stdout;
    assert!(audit.contains("admin.created"), "{audit}");

    for _ in 0..5 {
        assert_eq!(session(port, "ann", "wrong-password-123"), Err(401));
    }
    assert_eq!(session(port, "ann", ADMIN_PASSWORD), Err(429), "even the right password waits after 5 failures");
}

#[test]
fn every_page_works_and_a_schedule_runs_from_the_ui() {
    let Some(b) = Browser::start() else { return };
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &[]);
    let text = env.write("t.txt", "Hello {{ object.givenName }}\n");
    env.ok(&[
        "template",
        "set",
        "welcome",
        "--subject",
        "Hi {{ object.givenName }}",
        "--text-file",
        text.to_str().unwrap(),
    ]);
    let wf = env.write(
        "wf.json",
        r#"{"name": "welcome", "trigger": "user.created", "steps": [{"kind": "email", "template": "welcome", "to": ["a@example.org"]}]}"#,
    );
    env.ok(&["workflow", "create", "--file", wf.to_str().unwrap()]);
    account(&env, "ann", "admin");
    let port = env.serve();
    sign_in(&b, port, "ann");

    let base = format!("http://127.0.0.1:{port}");
    b.goto(&format!("{base}/schedules"));
    b.fill("#doc", r#"{"name": "nightly", "timezone": "Europe/Berlin", "cron": "0 2 * * *", "steps": [{"kind": "email", "subject": "s", "text": "t"}]}"#);
    b.click(&b.find("form[data-api] button[type=submit]"));
    b.wait_text("table", 10, |t| t.contains("nightly"));
    b.click(&b.find("button[data-action$='/nightly/run']"));
    b.wait_text("main", 10, |t| t.contains("manual") && t.contains("message"));
    assert!(b.page_text().contains("Next fire times"), "{}", b.page_text());

    b.goto(&format!("{base}/schedules"));
    b.fill("#doc", r#"{"name": "broken", "cron": "99 * * * *", "steps": []}"#);
    b.click(&b.find("form[data-api] button[type=submit]"));
    let errors = b.wait_text(".form-errors", 10, |t| !t.is_empty());
    assert!(errors.contains("cron") && errors.contains("steps"), "validation errors are shown: {errors}");

    b.goto(&format!("{base}/templates"));
    b.click(&b.find("button[data-load-template=welcome]"));
    b.wait_text("#t-name", 1, |_| true);
    b.click(&b.find("#preview-form button"));
    let preview = b.wait_text("#preview", 10, |t| !t.is_empty());
    assert!(preview.contains("Subject: Hi Ann"), "{preview}");

    // Storing a credential needs a license: the form says so and nothing is stored.
    b.goto(&format!("{base}/credentials"));
    b.fill("#c-name", "relay");
    b.fill("#c-username", "panel");
    b.fill("#c-secret", "not-stored-Secret-1");
    b.click(&b.find("#credential-form button[type=submit]"));
    let refused = b.wait_text("#credential-form .form-errors", 10, |t| !t.is_empty());
    assert!(refused.contains("credential-storage"), "{refused}");
    assert_eq!(b.script("return document.getElementById('c-secret').type"), "password", "write-only field");

    // An API token is revoked from its page, and stops working at once.
    let token = env.ok(&["admin", "token", "ann", "--label", "ui-revoke"]).stdout.trim().to_string();
    let bearer = format!("Authorization: Bearer {token}\r\n");
    assert_eq!(http_with(port, "GET", "/api/v1/queue", &bearer, "").0, 200);
    b.goto(&format!("{base}/tokens"));
    b.wait_text("main", 10, |t| t.contains("ui-revoke"));
    b.script("window.confirm = () => true; return 1");
    b.click(&b.find("button[data-confirm*='ui-revoke']"));
    b.wait_text("main", 10, |t| !t.contains("ui-revoke"));
    assert_eq!(http_with(port, "GET", "/api/v1/queue", &bearer, "").0, 401);

    for (path, expect) in [
        ("/workflows", "welcome"),
        ("/workflows/welcome", "user.created"),
        ("/licenses", "No license keys"),
        ("/credentials", "write-only"),
        ("/audit", "template.created"),
        ("/messages?state=delivered&since=1h", "Message log"),
        ("/messages?since=yesterday", "since"),
        // A filter that does not parse lists none of the messages the schedule made, not all.
        ("/messages?since=yesterday", "No messages match."),
    ] {
        b.goto(&format!("{base}{path}"));
        let text = b.wait_text("main", 10, |t| !t.is_empty());
        assert!(text.contains(expect), "{path}: {text}");
    }

    // On a phone-sized window nothing but the tables' own scroll areas is wider than the screen.
    b.resize(390, 844);
    for path in ["/", "/settings", "/messages", "/schedules/nightly", "/templates"] {
        b.goto(&format!("{base}{path}"));
        b.find("main");
        let overflow = b.script("return document.documentElement.scrollWidth - document.documentElement.clientWidth");
        assert!(overflow.as_i64().unwrap() <= 0, "{path} overflows a phone screen by {overflow}px");
    }
    // Every form field has a label.
    for path in ["/settings", "/messages", "/templates", "/credentials", "/schedules"] {
        b.goto(&format!("{base}{path}"));
        b.find("main");
        let unlabeled = b.script(
            "return [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
                .filter(e => !(e.id && document.querySelector(`label[for=\"${e.id}\"]`))).map(e => e.name || e.id)",
        );
        assert_eq!(unlabeled, serde_json::json!([]), "{path}: fields without a label");
    }
}

/// A sign-in from `client` through a trusted proxy on loopback (the test plays the proxy).
fn sign_in_via_proxy(port: u16, name: &str, password: &str, client: &str) -> u16 {
    let body = format!("name={name}&password={password}&next=%2F");
    http_with(port, "POST", "/login", &format!("X-Forwarded-For: {client}\r\n"), &body).0
}

#[test]
fn behind_a_trusted_proxy_one_client_cannot_lock_out_the_admins() {
    let mut env = Env::new();
    env.relay_on(2525, &[]);
    account(&env, "ann", "admin");
    account(&env, "bo", "admin");
    let config = std::fs::read_to_string(env.path().join("panel.toml")).unwrap();
    env.write("panel.toml", &format!("{config}[web]\ntrusted_proxies = [\"127.0.0.1\"]\n"));
    let port = env.serve();
    let ann_at_home = "198.51.100.10";
    assert_eq!(sign_in_via_proxy(port, "ann", ADMIN_PASSWORD, ann_at_home), 303);

    // Someone else guesses at ann's password: their address is stopped, not the proxy's.
    for _ in 0..5 {
        assert_eq!(sign_in_via_proxy(port, "ann", "wrong-password-123", "203.0.113.66"), 401);
    }
    assert_eq!(sign_in_via_proxy(port, "ann", ADMIN_PASSWORD, "203.0.113.66"), 429);
    assert_eq!(sign_in_via_proxy(port, "ann", ADMIN_PASSWORD, ann_at_home), 303, "ann is not locked out");
    assert_eq!(sign_in_via_proxy(port, "bo", ADMIN_PASSWORD, "198.51.100.20"), 303, "nor is anyone else");

    // The lock state is visible, and an admin can lift it.
    for _ in 0..3 {
        assert_eq!(sign_in_via_proxy(port, "bo", "wrong-password-123", "203.0.113.67"), 401);
    }
    let admins = env.ok(&["admin", "list", "--json"]).json();
    let bo = admins.as_array().unwrap().iter().find(|a| a["name"] == "bo").unwrap().clone();
    assert_eq!(bo["failed_sign_ins"], 3, "{admins:#}");
    assert!(env.ok(&["admin", "list"]).stdout.contains("3 wrong password(s) in the last 15 minutes"));
    let out = env.ok(&["admin", "unlock", "ann"]);
    assert!(out.stdout.contains("unlocked"), "{}", out.stdout);
    assert_eq!(sign_in_via_proxy(port, "ann", ADMIN_PASSWORD, "203.0.113.66"), 303, "unlocked");
    assert_eq!(env.panel(&["admin", "unlock", "nobody"]).code, 2, "not found");

    // Guessing spread over many addresses locks the name for addresses it never used, not
    // for the ones its owner signs in from.
    for i in 1..=50 {
        let status = sign_in_via_proxy(port, "bo", "wrong-password-123", &format!("192.0.2.{i}"));
        assert!(status == 401 || status == 429, "{status}");
    }
    assert_eq!(sign_in_via_proxy(port, "bo", ADMIN_PASSWORD, "192.0.2.200"), 429, "a new address waits");
    assert!(env.ok(&["admin", "list"]).stdout.contains("LOCKED until"));
    assert_eq!(sign_in_via_proxy(port, "bo", ADMIN_PASSWORD, "198.51.100.20"), 303, "bo's own address is not locked");

    // A client that is not a trusted proxy cannot pick its address with the header.
    let config = std::fs::read_to_string(env.path().join("panel.toml")).unwrap();
    env.write("panel.toml", &config.replace("\"127.0.0.1\"", "\"not-an-address\""));
    let bad = env.panel(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("web.trusted_proxies") && bad.stderr.contains("not-an-address"), "{}", bad.stderr);
}

/// Whether the element `css` stands within the window's width (seen without scrolling
/// sideways) and shows some text.
fn on_screen_with_text(b: &Browser, css: &str) -> bool {
    let seen = b.script(&format!(
        "const e = document.querySelector({css:?}); if (!e) return null;
         const r = e.getBoundingClientRect();
         return r.left >= 0 && r.right <= document.documentElement.clientWidth && e.innerText.trim().length > 0"
    ));
    seen == serde_json::json!(true)
}

#[test]
fn on_a_phone_every_page_fits_and_the_reason_of_a_failure_is_on_screen() {
    let Some(b) = Browser::start() else { return };
    let mut env = Env::new();
    // Nothing listens on the relay port: the message fails at tcp with the relay's address
    // and a hint, and waits an hour for its next try.
    env.relay_on(panel_testlab::free_port(), &["--retry-schedule", "1h"]);
    account(&env, "ann", "admin");
    let port = env.serve();
    let to = "a-rather-long-mailbox-name.for-a-phone-screen@accounts.subsidiary.example.org";
    let id = id_of(&env.ok(&["send", "--to", to, "--subject", "Password reset", "--text", "x", "--json"]));
    env.wait_message(id, WAIT, |m| m["state"] == "retrying");
    sign_in(&b, port, "ann");
    b.resize(390, 844);
    let base = format!("http://127.0.0.1:{port}");
    for (path, reason) in [
        ("/messages".to_string(), Some("#messages td[data-label='Last error']")),
        (format!("/messages/{id}"), Some("#attempts td[data-label='Hint']")),
        (format!("/messages/{id}"), Some("#attempts td[data-label='Reply']")),
        ("/".to_string(), None),
        ("/settings".to_string(), Some("#settings-history td[data-label='What changed']")),
        ("/audit".to_string(), None),
        ("/credentials".to_string(), None),
        ("/tokens".to_string(), None),
    ] {
        b.goto(&format!("{base}{path}"));
        b.find("main");
        let overflow = b.script("return document.documentElement.scrollWidth - document.documentElement.clientWidth");
        assert!(overflow.as_i64().unwrap() <= 0, "{path} overflows a phone screen by {overflow}px");
        if let Some(css) = reason {
            assert!(on_screen_with_text(&b, css), "{path}: {css} is not on screen:\n{}", b.page_text());
        }
    }
    b.goto(&format!("{base}/messages/{id}"));
    // The hint names the form's fields, not the CLI's flags (`messages show` keeps the flags).
    let hint = b.text(&b.find("#attempts td[data-label='Hint']"));
    assert!(hint.contains("\"Server\" and \"Port\"") && !hint.contains("--host"), "{hint}");
    let cli = env.ok(&["messages", "show", &id.to_string()]).stdout;
    assert!(cli.contains("check --host and --port"), "{cli}");
    b.screenshot(&screenshots().join("message-phone.png"));
}

#[test]
fn the_settings_form_sums_up_its_problems_explains_passwords_and_restores_a_version() {
    let Some(b) = Browser::start() else { return };
    let mut env = Env::new();
    env.relay_on(2525, &[]);
    env.ok(&["smtp", "set", "--port", "2626"]);
    account(&env, "ann", "admin");
    let port = env.serve();
    sign_in(&b, port, "ann");
    let shown =
        |id: &str| b.script(&format!("return !document.getElementById('{id}').hidden")) == serde_json::json!(true);

    // Password mode says where the password goes, since the page has no password field.
    assert!(!shown("password-note"), "auth none needs no password");
    b.select("#f-auth", "password");
    assert!(shown("password-note") && !shown("ntlm-note"));
    let note = b.text(&b.find("#password-note"));
    assert!(note.contains("stored credential") && note.contains("--password-file"), "{note}");
    b.select("#f-auth", "");

    // Problems further up the page are summed up next to the button; nothing is saved.
    b.fill("#f-port", "70000");
    b.fill("#f-from", "not an address");
    b.click(&b.find("#save"));
    let summary = b.wait_text("#error-summary", 10, |t| !t.is_empty());
    assert_eq!(summary, "2 problems, nothing saved: Port, From address");
    assert_eq!(env.ok(&["smtp", "show", "--json"]).json()["version"], 2, "nothing saved");
    b.fill("#f-port", "2626");
    b.fill("#f-from", "Identity Panel <panel@example.org>");
    b.click(&b.find("#save"));
    b.wait_text("#error-summary", 10, str::is_empty);

    // The history lists each version's changes; an earlier one is restored as a new version.
    b.goto(&format!("http://127.0.0.1:{port}/settings"));
    let history = b.wait_text("#settings-history", 10, |t| t.contains("port: 2525 -> 2626"));
    assert!(history.contains("(in force)"), "{history}");
    b.script("window.confirm = () => true; return 1");
    b.click(&b.find("button[data-action$='/versions/1/restore']"));
    b.wait_text("main > p", 10, |t| t.contains("Version 3"));
    assert_eq!(env.ok(&["smtp", "show", "--json"]).json()["effective"]["port"], 2525);
    assert!(b.text(&b.find("#settings-history")).contains("port: 2626 -> 2525"));
}

#[test]
fn the_first_start_prints_a_setup_link_that_makes_the_first_admin_once_and_guides_to_a_test_message() {
    let Some(b) = Browser::start() else { return };
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    let port = panel_testlab::free_port();
    let out = env.start_first_serve(port);
    let deadline = std::time::Instant::now() + WAIT;
    let link = loop {
        let printed = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(link) = printed.split_whitespace().find(|w| w.starts_with("http://127.0.0.1:")) {
            break link.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no setup link printed: {printed}{}", env.service_logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(link.starts_with(&format!("http://127.0.0.1:{port}/setup/")), "{link}");
    assert!(env.service_logs().contains("setup link"), "logged once too");

    // The sign-in page points at the link; the link's page makes the first admin.
    b.goto(&format!("http://127.0.0.1:{port}/login"));
    assert!(b.text(&b.find("#no-admin")).contains("setup link"));
    b.goto(&link);
    b.fill("#name", "ann");
    b.fill("#password", ADMIN_PASSWORD);
    b.fill("#confirm", "something else entirely");
    b.click(&b.find("#create-admin"));
    let error = b.wait_text("#setup-error", 10, |t| !t.is_empty());
    assert!(error.contains("differ"), "{error}");
    b.fill("#password", ADMIN_PASSWORD);
    b.fill("#confirm", ADMIN_PASSWORD);
    b.click(&b.find("#create-admin"));
    // Signed in, on the relay settings, which a new installation needs first.
    b.wait_text("#who", 20, |t| t.contains("ann"));
    assert!(b.url().ends_with("/settings"), "{}", b.url());
    assert!(b.page_text().contains("Not configured yet"));
    let admins = env.ok(&["admin", "list", "--json"]).json();
    assert_eq!((admins[0]["name"].as_str(), admins[0]["role"].as_str()), (Some("ann"), Some("admin")));
    let audit = env.ok(&["audit", "list", "--json"]).stdout;
    assert!(audit.contains("setup link"), "{audit}");

    // The dashboard says what is missing instead of empty numbers.
    b.goto(&format!("http://127.0.0.1:{port}/"));
    let started = b.text(&b.find("#getting-started"));
    assert!(started.contains("Server, From address, Fallback recipient"), "{started}");
    assert!(b.try_find("#queue-depth").is_none(), "no empty numbers");

    // The guided settings: Check connection works before Save, then Save and the Test Message.
    b.goto(&format!("http://127.0.0.1:{port}/settings"));
    b.fill("#f-host", "127.0.0.1");
    b.select("#f-security", "none");
    b.fill("#f-port", &sink.port.to_string());
    b.fill("#f-from", "Identity Panel <panel@example.org>");
    b.fill("#f-fallback_recipient", "ops@example.org");
    b.click(&b.find("#check"));
    b.wait_text("#check-stages", 20, |t| t.contains("rcpt"));
    assert!(b.page_text().contains("not saved"), "checked as the form shows it");
    b.click(&b.find("#save"));
    b.wait_text("main > p", 10, |t| t.contains("Version 1"));
    b.click(&b.find("#test-message"));
    let status = b.wait_text("#test-status", 40, |t| t.starts_with("delivered") || t.contains("failed"));
    assert!(status.starts_with("delivered"), "{status}");

    // The link worked once: now it is spent, and says what to do instead.
    let (status, _, page) = http_with(port, "GET", &link.replace(&format!("http://127.0.0.1:{port}"), ""), "", "");
    assert_eq!(status, 404, "{page}");
    assert!(page.contains("used, expired"), "{page}");
}

#[test]
fn a_standby_route_is_added_checked_and_shown_taking_the_mail_in_the_ui() {
    let Some(b) = Browser::start() else { return };
    let mut env = Env::new();
    let primary = panel_testlab::RecordingSink::start();
    let standby = panel_testlab::RecordingSink::start();
    env.relay_on(primary.port, &[]);
    account(&env, "ann", "admin");
    let port = env.serve();
    sign_in(&b, port, "ann");

    // Added from the main settings page with its relay, then completed on its own page.
    b.fill("#r-name", "standby");
    b.fill("#r-host", "127.0.0.1");
    b.fill("#r-port", &standby.port.to_string());
    b.click(&b.find("#add-route"));
    b.wait_text("#route-list", 10, |t| t.contains("standby"));
    b.click(&b.find("#route-list a[href='/settings/routes/standby']"));
    b.wait_text("h1", 10, |t| t == "Standby route standby");
    assert!(b.try_find("#f-from").is_none() && b.try_find("#f-retry_schedule").is_none(), "the installation's fields");
    assert!(b.try_find("#test-message").is_none());
    b.select("#f-security", "none");
    b.click(&b.find("#check"));
    let stages = b.wait_text("#check-stages", 20, |t| t.contains("quit"));
    assert!(stages.contains("rcpt"), "{stages}");
    assert_eq!(standby.total(), 0, "a check sends nothing");
    b.click(&b.find("#save"));
    b.wait_text("main > p", 10, |t| t.contains(&format!("127.0.0.1:{}", standby.port)));

    // The primary refuses service: the message goes by the standby, and the pages say so.
    primary.set_refusing(true);
    let id = id_of(&env.ok(&["send", "--to", "a@example.org", "--subject", "reset", "--text", "x", "--json"]));
    env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    b.goto(&format!("http://127.0.0.1:{port}/"));
    let routes = b.wait_text("#routes", 10, |t| t.contains("failing"));
    assert!(routes.contains("in use") && routes.contains("421"), "{routes}");
    assert!(b.text(&b.find("#banner")).starts_with("Route primary is failing"));
    b.screenshot(&screenshots().join("routes.png"));
    b.goto(&format!("http://127.0.0.1:{port}/messages/{id}"));
    let attempts = b.wait_text("#attempts", 10, |t| t.contains("(route standby)"));
    assert!(attempts.contains("(route primary)"), "{attempts}");
}

#[test]
fn a_bounce_after_the_relays_250_shows_on_the_message_and_the_dashboard() {
    let Some(b) = Browser::start() else { return };
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    let listen = panel_testlab::free_port();
    env.relay_on(sink.port, &["--bounce-domain", "bounces.panel.test"]);
    account(&env, "ann", "admin");
    let port = env.serve_with(&["--bounce-listen", &format!("127.0.0.1:{listen}")]);
    let id = id_of(&env.ok(&["send", "--to", "gone@example.net", "--subject", "Reset", "--text", "x", "--json"]));
    env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    let mail = sink.mail_commands().pop().unwrap();
    let verp = mail.trim_start_matches("MAIL FROM:<").split('>').next().unwrap().to_string();
    let ndr = "From: postmaster@contoso.example\nSubject: Undeliverable: Reset\n\nDelivery has failed to these recipients or groups:\ngone@example.net\nRemote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found'";
    assert!(crate::bounces::smtp_deliver(listen, &verp, ndr).last().unwrap().starts_with("250"));
    env.wait_message(id, WAIT, |m| m["state"] == "bounced");

    sign_in(&b, port, "ann");
    b.goto(&format!("http://127.0.0.1:{port}/messages/{id}"));
    let table = b.wait_text("#bounces", 10, |t| t.contains("bounced"));
    assert!(table.contains("gone@example.net") && table.contains("550 5.1.10"), "{table}");
    b.screenshot(&screenshots().join("bounce.png"));
    b.goto(&format!("http://127.0.0.1:{port}/"));
    assert_eq!(b.wait_text("#last-day-bounced", 10, |t| t.contains("bounced")), "1 bounced");
}
