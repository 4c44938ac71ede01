//! Routes: a standby relay that takes the mail when the primary fails, against two real
//! Postfix relays on loopback.

use std::time::{Duration, Instant};

use panel_testlab::{PostfixLab, REJECT_PREFIX};
use serde_json::Value;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(30);

/// The route each attempt of a message went by, in order.
fn routes(m: &Value) -> Vec<String> {
    m["attempts"].as_array().unwrap().iter().map(|a| a["route"].as_str().unwrap_or("-").to_string()).collect()
}

fn send(env: &Env, to: &str, subject: &str) -> i64 {
    id_of(&env.ok(&["send", "--to", to, "--subject", subject, "--text", "Reset your password.", "--json"]))
}

fn dashboard(port: u16) -> Value {
    let (status, body) = http(port, "GET", "/api/v1/dashboard", "");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn route_states(d: &Value) -> Vec<(String, String)> {
    d["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r["state"].as_str().unwrap().to_string()))
        .collect()
}

/// Both labs, the primary on `primary_args`, and the standby on the other lab's plain port.
fn two_routes(primary_args: impl FnOnce(&Env, &PostfixLab)) -> Option<(Env, PostfixLab, PostfixLab, u16)> {
    let primary = PostfixLab::start()?;
    let standby = PostfixLab::start()?;
    let mut env = Env::new();
    primary_args(&env, &primary);
    let standby_port = standby.plain_port.to_string();
    let r = env.ok(&[
        "smtp",
        "set",
        "--route",
        "standby",
        "--host",
        "127.0.0.1",
        "--port",
        &standby_port,
        "--security",
        "none",
        "--connect-timeout",
        "3",
        "--command-timeout",
        "5",
    ]);
    assert!(
        r.stdout.contains("Standby routes, tried in this order") && r.stdout.contains("route standby"),
        "{}",
        r.stdout
    );
    let port = env.serve();
    Some((env, primary, standby, port))
}

#[test]
fn a_stopped_primary_hands_the_mail_to_the_standby_at_once_and_gets_it_back_when_it_returns() {
    let Some((env, primary, standby, port)) = two_routes(|env, lab| env.configure(lab, lab.plain_port, "none", &[]))
    else {
        return;
    };
    let id = send(&env, "alice@example.org", "before the outage");
    let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    assert_eq!(routes(&m), ["primary"]);
    primary.wait_for_messages("before the outage", 1, WAIT);

    // A recipient's own 550 on the route in use: failed, and no other route is asked.
    let refused = send(&env, &format!("{REJECT_PREFIX}bob@example.org"), "refused by the recipient");
    let m = env.wait_message(refused, WAIT, |m| m["state"] == "failed");
    assert_eq!(routes(&m), ["primary"], "{m:#}");

    // The primary stops. The next message is tried there, then delivered by the standby at
    // once (its retry would be a minute later), and its log says which route said what.
    primary.stop();
    let started = Instant::now();
    let id = send(&env, "alice@example.org", "password reset during the outage");
    let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    let failover = started.elapsed();
    assert_eq!(routes(&m), ["primary", "standby"], "{m:#}");
    assert_eq!(m["attempts"][0]["stage"], "tcp", "{m:#}");
    standby.wait_for_messages("password reset during the outage", 1, WAIT);
    let at =
        |i: usize| chrono::DateTime::parse_from_rfc3339(m["attempts"][i]["finished_at"].as_str().unwrap()).unwrap();
    eprintln!(
        "failover: enqueue -> delivered by the standby {} ms (the primary's refusal -> the standby's 250: {} ms)",
        failover.as_millis(),
        (at(1) - at(0)).num_milliseconds()
    );
    let shown = env.ok(&["messages", "show", &id.to_string()]).stdout;
    assert!(shown.contains("(route primary)") && shown.contains("(route standby)"), "{shown}");

    // Every route is checked; the standby is the one in use, and the exit code says one fails.
    let check = env.panel(&["smtp", "check"]);
    assert_eq!(check.code, 1, "{}", check.stdout);
    assert!(
        check.stdout.contains("route standby: Checking relay") && check.stdout.contains("In use: route standby"),
        "{}",
        check.stdout
    );
    let d = dashboard(port);
    assert_eq!(route_states(&d), [("primary".into(), "failing".into()), ("standby".into(), "in use".into())]);
    assert!(d["banner"].as_str().unwrap_or_default().starts_with("Route primary is failing"), "{d:#}");

    // Back: once its backoff runs out a message probes it, and mail goes by the primary again.
    primary.resume();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let id = send(&env, "alice@example.org", "after the outage");
        let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
        if routes(&m).last().map(String::as_str) == Some("primary") {
            break;
        }
        assert!(Instant::now() < deadline, "mail never went back to the primary: {m:#}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(route_states(&dashboard(port))[0], ("primary".into(), "in use".into()));
    let metrics = http(port, "GET", "/metrics", "").1;
    assert!(metrics.contains("panel_route_failovers_total"), "{metrics}");
}

#[test]
fn a_rejected_password_on_the_primary_sends_by_the_standby_and_the_dashboard_names_the_problem() {
    let Some((env, _primary, standby, port)) = two_routes(|env, lab| {
        let args = env.password_args("not-the-password");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.configure(lab, lab.submission_port, "starttls", &args);
    }) else {
        return;
    };
    let id = send(&env, "carol@example.org", "welcome");
    let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    assert_eq!(routes(&m), ["primary", "standby"], "{m:#}");
    assert_eq!((m["attempts"][0]["stage"].as_str(), m["attempts"][0]["code"].as_i64()), (Some("auth"), Some(535)));
    assert_eq!(m["attempts"][0]["outcome"], "configuration_error");
    standby.wait_for_messages("welcome", 1, WAIT);
    let d = dashboard(port);
    let banner = d["banner"].as_str().unwrap_or_default();
    assert!(banner.starts_with("Route primary is failing (at AUTH: ") && banner.contains("535"), "{d:#}");
    assert_eq!(d["queue"]["held"], 0, "nothing is held while a route can send it: {d:#}");
}

#[test]
fn a_route_is_managed_from_the_cli_and_the_api_and_bad_input_changes_nothing() {
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    // Before any settings, a route has nothing to stand by for.
    let r = env.panel(&["smtp", "set", "--route", "standby", "--host", "127.0.0.1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("save the main settings first"), "{}", r.stderr);
    env.relay_on(sink.port, &[]);
    let version = |env: &Env| env.ok(&["smtp", "show", "--json"]).json()["version"].as_i64().unwrap();
    let before = version(&env);
    // A whole-installation setting and a bad name are refused together, and nothing is stored.
    let r = env.panel(&["smtp", "set", "--route", "Bad Name", "--from", "x@example.org", "--host", "h.example"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("route: 'Bad Name' is not a route name"), "{}", r.stderr);
    assert!(r.stderr.contains("from: belongs to the whole installation"), "{}", r.stderr);
    assert_eq!(version(&env), before);
    let port = env.serve();
    let token = bearer(port);
    let put = |body: &str| http_with(port, "PUT", "/api/v1/settings/smtp/routes/backup", &token, body);
    // Through the API a route may not read a local password file either.
    let (status, _, body) =
        put(r#"{"host":"127.0.0.1","auth":"password","username":"u","password_file":"/etc/shadow"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("password_file"), "{body}");
    let (status, _, body) = put(&format!(r#"{{"host":"127.0.0.1","port":{},"security":"none"}}"#, sink.port));
    assert_eq!(status, 200, "{body}");
    let saved: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(saved["effective"]["routes"][0]["name"], "backup", "{saved:#}");
    assert!(saved["effective"]["routes"][0]["settings"].get("from").is_none(), "only its own settings: {saved:#}");
    let history = env.ok(&["smtp", "history", "--limit", "1"]).stdout;
    assert!(history.contains("route backup added"), "{history}");
    // A main save may not name the routes: they change one at a time.
    let (status, _, body) = http_with(port, "PUT", "/api/v1/settings/smtp", &token, r#"{"routes":[]}"#);
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = http_with(port, "DELETE", "/api/v1/settings/smtp/routes/nope", &token, "");
    assert_eq!(status, 404, "{body}");
    let r = env.ok(&["smtp", "remove-route", "backup"]);
    assert!(!r.stdout.contains("Standby routes"), "{}", r.stdout);
    assert!(env.ok(&["smtp", "history", "--limit", "1"]).stdout.contains("route backup removed"));
}
