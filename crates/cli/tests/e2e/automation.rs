//! Templates, workflows, schedules and dispatch, end to end: the `panel` binary as a user runs
//! it, a worker delivering through a private Postfix, the Maildir checked.

use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// A lab relay, a running worker, and the "welcome" template (subject, text and HTML).
fn setup() -> Option<(PostfixLab, Env)> {
    let lab = PostfixLab::start()?;
    let mut env = Env::new();
    env.configure(&lab, lab.plain_port, "none", &[]);
    welcome_template(&env);
    env.spawn(&["worker"]);
    Some((lab, env))
}

fn welcome_template(env: &Env) {
    let text = env.write("welcome.txt", "Hello {{ object.givenName }},\nyour account {{ object.login }} is ready.\n");
    let html = env.write("welcome.html", "<p>Hello <b>{{ object.givenName }}</b></p>\n");
    env.ok(&[
        "template",
        "set",
        "welcome",
        "--subject",
        "Welcome {{ object.givenName }}",
        "--text-file",
        &text.display().to_string(),
        "--html-file",
        &html.display().to_string(),
    ]);
}

fn create(env: &Env, what: &str, def: Value) {
    let file = env.write(&format!("{what}.json"), &def.to_string());
    env.ok(&[what, "create", "--file", &file.display().to_string()]);
}

fn welcome_workflow(env: &Env) {
    create(
        env,
        "workflow",
        json!({"name": "welcome", "enabled": true, "trigger": "user.created",
            "condition": "object.department == 'Finance'",
            "steps": [{"kind": "email", "template": "welcome", "to": ["{{ object.manager.mail }}"], "cc": [], "bcc": []}]}),
    );
}

fn post_event(env: &Env, object: Value, extra: &[&str]) -> Value {
    let file = env.write("event.json", &object.to_string());
    let mut args = vec!["event", "post", "user.created", "--data", file.to_str().unwrap(), "--json"];
    args.extend(extra);
    env.ok(&args).json()
}

/// Waits until every message of `run` is delivered; returns their ids.
fn delivered(env: &Env, run: &Value) -> Vec<i64> {
    let ids: Vec<i64> = run["messages"].as_array().unwrap().iter().map(|m| m["id"].as_i64().unwrap()).collect();
    assert!(!ids.is_empty(), "the run made no message: {run:#}");
    for id in &ids {
        env.wait_message(*id, WAIT, |m| m["state"] == "delivered");
    }
    ids
}

#[test]
fn a_workflow_on_user_created_sends_the_manager_a_rendered_welcome_mail() {
    let Some((lab, env)) = setup() else { return };
    welcome_workflow(&env);
    let object = json!({"givenName": "Ann <script>alert(1)</script>", "login": "ann", "department": "Finance",
        "manager": {"mail": "boss@example.org"}});
    let out = post_event(&env, object, &[]);
    assert_eq!(out["created"], true);
    let run = &out["runs"][0];
    assert_eq!(run["name"], "welcome");
    assert_eq!(run["trigger"], "event");
    let id = delivered(&env, run)[0];
    let m = env.message(id);
    assert_eq!(m["origin"], "workflow");
    assert_eq!(m["to"], json!(["boss@example.org"]));

    let mail = &lab.wait_for_messages(m["message_id"].as_str().unwrap(), 1, WAIT)[0];
    assert!(mail.contains("To: boss@example.org"), "{mail}");
    assert!(mail.contains("Subject: Welcome Ann <script>alert(1)</script>"), "{mail}");
    assert!(mail.contains("multipart/alternative"), "{mail}");
    assert!(mail.contains("your account ann is ready."), "text part: {mail}");
    // The HTML part carries the event's data escaped: no live markup from outside.
    assert!(mail.contains("<p>Hello <b>Ann &lt;script&gt;alert(1)&lt;&#x2f;script&gt;</b></p>"), "{mail}");
    assert!(!mail.contains("<b>Ann <script>"), "{mail}");

    let history = env.ok(&["workflow", "history", "welcome", "--json"]).json();
    assert_eq!(history[0]["messages"][0]["state"], "delivered");
}

#[test]
fn recipients_that_resolve_to_nothing_go_to_the_fallback_recipient() {
    let Some((lab, env)) = setup() else { return };
    welcome_workflow(&env);
    let out = post_event(&env, json!({"givenName": "Bo", "login": "bo", "department": "Finance"}), &[]);
    let run = &out["runs"][0];
    let note = run["steps"][0]["note"].as_str().unwrap();
    assert!(note.contains("to[0] `{{ object.manager.mail }}` rendered empty"), "{note}");
    let id = delivered(&env, run)[0];
    let m = env.message(id);
    assert_eq!(m["used_fallback_recipient"], true);
    let mail = &lab.wait_for_messages(m["message_id"].as_str().unwrap(), 1, WAIT)[0];
    assert!(mail.contains("To: ops@example.org"), "{mail}");
    let text = env.ok(&["workflow", "history", "welcome"]).stdout;
    assert!(text.contains("sent to the Fallback recipient"), "{text}");
}

#[test]
fn a_false_condition_sends_nothing_and_a_repeated_event_runs_once() {
    let Some((_lab, env)) = setup() else { return };
    welcome_workflow(&env);
    let hr =
        post_event(&env, json!({"givenName": "Cy", "department": "HR", "manager": {"mail": "b@example.org"}}), &[]);
    assert_eq!(hr["runs"], json!([]), "{hr:#}");
    let object =
        json!({"givenName": "Di", "login": "di", "department": "Finance", "manager": {"mail": "b@example.org"}});
    let first = post_event(&env, object.clone(), &["--idempotency-key", "hr-system-4711"]);
    let again = post_event(&env, object, &["--idempotency-key", "hr-system-4711"]);
    assert_eq!(again["created"], false);
    assert_eq!(again["event_id"], first["event_id"]);
    assert_eq!(again["runs"][0]["id"], first["runs"][0]["id"], "the first run is reported, none is added");
    let list = env.ok(&["messages", "list", "--json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 1, "one message for two posts of one event: {list:#}");
    let history = env.ok(&["workflow", "history", "welcome", "--json"]).json();
    assert_eq!(history.as_array().unwrap().len(), 1);
}

#[test]
fn a_schedule_run_by_hand_sends_its_messages_with_an_attachment() {
    let Some((lab, env)) = setup() else { return };
    create(
        &env,
        "schedule",
        json!({"name": "weekly-report", "enabled": true, "timezone": "Europe/Berlin", "cron": "0 9 * * MON-FRI",
        "data": {"users": ["ann", "bo"]},
        "steps": [
            {"kind": "email", "subject": "Report for {{ schedule.name }}", "text": "{{ data.users | length }} users",
             "to": ["auditors@example.org"],
             "attachments": [{"filename": "users.csv", "content_type": "text/csv",
                              "content": "login\n{% for u in data.users %}{{ u }}\n{% endfor %}"}]},
            {"kind": "email", "template": "welcome", "to": ["x@example.org"]}
        ]}),
    );
    let next = env.ok(&["schedule", "next", "weekly-report", "--count", "3", "--json"]).json();
    let times = next["next"].as_array().unwrap();
    assert_eq!(times.len(), 3);
    assert!(times.iter().all(|t| t.as_str().unwrap().contains("T09:00:00+01:00")), "{next:#}");

    let out = env.panel(&["schedule", "run", "weekly-report", "--json"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let run = &out.json()[0];
    assert_eq!(run["trigger"], "manual");
    assert_eq!(run["status"], "partial", "the second step's template needs an object: {run:#}");
    let error = run["steps"][1]["error"].as_str().unwrap();
    assert!(error.contains("undefined") && error.contains("object.givenName"), "{error}");
    let id = delivered(&env, run)[0];
    let m = env.message(id);
    assert_eq!(m["origin"], "schedule");
    let mail = &lab.wait_for_messages(m["message_id"].as_str().unwrap(), 1, WAIT)[0];
    assert!(mail.contains("Subject: Report for weekly-report"), "{mail}");
    assert!(mail.contains("filename=\"users.csv\""), "{mail}");
    assert!(mail.contains("login\nann\nbo"), "{mail}");

    let history = env.ok(&["schedule", "history", "weekly-report"]).stdout;
    assert!(history.contains("manual") && history.contains("step 1: failed"), "{history}");
}

#[test]
fn dispatch_runs_inline_steps_with_origin_dispatch() {
    let Some((lab, env)) = setup() else { return };
    let file = env.write(
        "dispatch.json",
        &json!({"name": "test-runner", "data": {"suite": "login", "passed": 41, "failed": 1},
            "steps": [{"kind": "email", "subject": "{{ data.suite }}: {{ data.failed }} failed", "text": "{{ data.passed }} passed",
                       "to": ["qa@example.org"]}]})
        .to_string(),
    );
    let run = env.ok(&["dispatch", "--file", file.to_str().unwrap(), "--json"]).json()[0].clone();
    assert_eq!(run["kind"], "dispatch");
    let id = delivered(&env, &run)[0];
    assert_eq!(env.message(id)["origin"], "dispatch");
    let shown = env.ok(&["run", "show", &run["id"].to_string(), "--json"]).json();
    assert_eq!(shown[0]["messages"][0]["state"], "delivered");
    let mail = &lab.wait_for_messages("Subject: login: 1 failed", 1, WAIT)[0];
    assert!(mail.contains("41 passed"), "{mail}");
}

#[test]
fn template_errors_name_the_line_and_the_variable_and_endless_loops_stop() {
    let env = Env::new();
    let bad = env.write("bad.txt", "Hello\n{% if x %}\nunclosed\n");
    let out = env.panel(&["template", "set", "broken", "--subject", "s", "--text-file", bad.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("text") && out.stderr.contains("line"), "{}", out.stderr);
    assert!(env.ok(&["template", "list", "--json"]).json().as_array().unwrap().is_empty(), "nothing stored");

    let typo = env.write("typo.txt", "Dear {{ object.givenName }},\nyour login is {{ object.logn }}.\n");
    env.ok(&["template", "set", "typo", "--subject", "s", "--text-file", typo.to_str().unwrap()]);
    let data = env.write("data.json", r#"{"object": {"givenName": "Ann", "login": "ann"}}"#);
    let out = env.panel(&["template", "render", "typo", "--data", data.to_str().unwrap()]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("text, line 2"), "{}", out.stderr);
    assert!(out.stderr.contains("object.logn"), "{}", out.stderr);

    let endless = env
        .write("loop.txt", "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}");
    env.ok(&["template", "set", "endless", "--subject", "s", "--text-file", endless.to_str().unwrap()]);
    let started = Instant::now();
    let out = env.panel(&["template", "render", "endless", "--data", data.to_str().unwrap()]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("fuel"), "{}", out.stderr);
    assert!(started.elapsed() < Duration::from_secs(20), "stopped by the fuel limit, not by the test");

    let ok = env.write("ok.txt", "Dear {{ object.givenName }}\n");
    env.ok(&["template", "set", "ok", "--subject", "Hi {{ object.givenName }}", "--text-file", ok.to_str().unwrap()]);
    let preview = env.ok(&["template", "render", "ok", "--data", data.to_str().unwrap(), "--json"]).json();
    assert_eq!(preview["subject"], "Hi Ann");
    assert_eq!(preview["text"], "Dear Ann\n");
}

#[test]
fn definitions_are_validated_exported_and_imported() {
    let env = Env::new();
    let bad = env.write(
        "bad.json",
        &json!({"name": "nightly", "timezone": "Mars/Base", "cron": "99 * * * *",
            "steps": [{"kind": "email", "template": "missing", "to": ["{{ object.x"]}]})
        .to_string(),
    );
    let out = env.panel(&["schedule", "create", "--file", bad.to_str().unwrap()]);
    assert_eq!(out.code, 2);
    for field in ["cron:", "timezone:", "steps[0].to[0]"] {
        assert!(out.stderr.contains(field), "{field} in {}", out.stderr);
    }
    let typo = env.write("typo.json", r#"{"name": "x", "trigger": "user.created", "stepz": []}"#);
    let out = env.panel(&["workflow", "create", "--file", typo.to_str().unwrap()]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("unknown field `stepz`"), "{}", out.stderr);

    let text = env.write("t.txt", "x");
    env.ok(&["template", "set", "t", "--subject", "s", "--text-file", text.to_str().unwrap()]);
    let good = json!({"name": "nightly", "timezone": "UTC", "weekly": {"weekdays": ["MON", "THU"], "start_time": "02:00"},
        "steps": [{"kind": "email", "template": "t", "to": ["a@example.org"]}]});
    create(&env, "schedule", good.clone());
    let out = env.panel(&["schedule", "create", "--file", env.path().join("schedule.json").to_str().unwrap()]);
    assert_eq!(out.code, 1, "a name is created once");
    assert!(out.stderr.contains("exists already"), "{}", out.stderr);
    let out = env.panel(&["template", "delete", "t"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("schedule 'nightly'"), "a used template is kept: {}", out.stderr);

    let export = env.path().join("export.json");
    env.ok(&["schedule", "export", "--out", export.to_str().unwrap()]);
    env.ok(&["schedule", "delete", "nightly"]);
    env.ok(&["schedule", "import", "--file", export.to_str().unwrap()]);
    let shown = env.ok(&["schedule", "show", "nightly"]).json();
    assert_eq!(shown["weekly"]["weekdays"], json!(["MON", "THU"]));
    env.ok(&["schedule", "disable", "nightly"]);
    let list = env.ok(&["schedule", "list", "--json"]).json();
    assert_eq!(list[0]["enabled"], false);
    assert!(list[0]["next_fire_at"].is_null(), "a disabled schedule has no next fire time");
}

/// Fire times of a schedule's clock-driven runs, oldest first.
fn fire_times(env: &Env, name: &str) -> Vec<(String, String, Value)> {
    let history = env.ok(&["schedule", "history", name, "--limit", "1000", "--json"]).json();
    let mut runs: Vec<(String, String, Value)> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["trigger"] != "manual")
        .map(|r| (r["fire_time"].as_str().unwrap().to_string(), r["trigger"].as_str().unwrap().to_string(), r.clone()))
        .collect();
    runs.sort_by(|a, b| a.0.cmp(&b.0));
    runs
}

#[test]
fn a_due_schedule_runs_once_per_fire_time_with_two_services() {
    let Some(lab) = PostfixLab::start() else { return };
    let Some(mut env) = Env::postgres() else { return };
    env.configure(&lab, lab.plain_port, "none", &[]);
    // Every 2 seconds (cron with seconds), so a short real window holds several fire times.
    create(
        &env,
        "schedule",
        json!({"name": "tick", "timezone": "Europe/Berlin", "cron": "*/2 * * * * *",
            "steps": [{"kind": "email", "subject": "tick {{ schedule.fire_time }}", "text": "t", "to": ["tick@example.org"]}]}),
    );
    env.spawn(&["worker"]);
    env.spawn(&["worker"]);
    env.wait_for_services(2);
    // Until four fire times ran (about 8 s); the rules are checked on whatever ran by then.
    let deadline = Instant::now() + WAIT;
    while fire_times(&env, "tick").len() < 4 {
        assert!(Instant::now() < deadline, "fewer than four fire times in {WAIT:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    env.ok(&["schedule", "disable", "tick"]);
    let runs = fire_times(&env, "tick");
    let times: Vec<chrono::DateTime<chrono::FixedOffset>> =
        runs.iter().map(|r| chrono::DateTime::parse_from_rfc3339(&r.0).unwrap()).collect();
    // No fire time runs twice, and none is skipped silently: on a loaded machine a scheduler may
    // wake late, and then the run says how many fire times it caught up on.
    for (i, pair) in times.windows(2).enumerate() {
        let gap = (pair[1] - pair[0]).num_seconds();
        assert!(gap >= 2 && gap % 2 == 0, "fire times are distinct and on the rule: {runs:?}");
        let later = &runs[i + 1].2;
        assert_eq!(later["missed"].as_i64().unwrap(), gap / 2 - 1, "a gap is reported as missed: {later:#}");
    }
    assert!(runs.iter().filter(|r| r.1 == "cron").count() >= 2, "mostly on time: {runs:?}");
    // Every run's message is delivered, once per fire time.
    for (_, _, run) in &runs {
        delivered(&env, run);
    }
    let deadline = Instant::now() + WAIT;
    while lab.messages_with("To: tick@example.org").len() < runs.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(lab.messages_with("To: tick@example.org").len(), runs.len(), "one mail per fire time");
}

#[test]
fn the_api_takes_events_dispatches_and_templates() {
    let Some(lab) = PostfixLab::start() else { return };
    let mut env = Env::new();
    env.configure(&lab, lab.plain_port, "none", &[]);
    let port = env.serve();

    let (status, body) =
        http(port, "PUT", "/api/v1/templates/welcome", r#"{"subject": "Hi {{ object.name }}", "text": "Welcome"}"#);
    assert_eq!(status, 201, "{body}");
    let (status, body) = http(port, "POST", "/api/v1/templates/welcome/render", r#"{"object": {}}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("object.name"), "{body}");
    let workflow = json!({"name": "welcome", "trigger": "user.created",
        "steps": [{"kind": "email", "template": "welcome", "to": ["{{ object.mail }}"]}]});
    assert_eq!(http(port, "POST", "/api/v1/workflows", &workflow.to_string()).0, 201);
    assert_eq!(http(port, "POST", "/api/v1/workflows", &workflow.to_string()).0, 409, "created once");

    let event =
        json!({"type": "user.created", "object": {"name": "Eve", "mail": "eve@example.org"}, "idempotency_key": "k1"});
    let (status, body) = http(port, "POST", "/api/v1/events", &event.to_string());
    assert_eq!(status, 202, "{body}");
    let first: Value = serde_json::from_str(&body).unwrap();
    let (status, body) = http(port, "POST", "/api/v1/events", &event.to_string());
    assert_eq!(status, 200, "a repeated key answers the first event: {body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["event_id"], first["event_id"]);
    delivered(&env, &first["runs"][0]);
    assert_eq!(lab.wait_for_messages("Subject: Hi Eve", 1, WAIT).len(), 1);

    let bad_address = json!({"type": "user.created", "object": {"name": "Mal", "mail": "mal@@example.org"}});
    let (_, body) = http(port, "POST", "/api/v1/events", &bad_address.to_string());
    let run: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(run["runs"][0]["status"], "failed", "{run:#}");
    let error = run["runs"][0]["steps"][0]["error"].as_str().unwrap();
    assert!(error.contains("{{ object.mail }}") && error.contains("mal@@example.org"), "{error}");

    let dispatch = json!({"name": "ci", "steps": [{"kind": "email", "subject": "CI done", "text": "ok"}]});
    let (status, body) = http(port, "POST", "/api/v1/dispatch", &dispatch.to_string());
    assert_eq!(status, 202, "{body}");
    let run: Value = serde_json::from_str(&body).unwrap();
    let (status, body) = http(port, "GET", &format!("/api/v1/runs/{}", run["id"]), "");
    assert_eq!(status, 200);
    assert!(body.contains("\"kind\":\"dispatch\""), "{body}");
    delivered(&env, &run);
    let (status, body) = http(port, "POST", "/api/v1/dispatch", r#"{"name": "ci", "steps": []}"#);
    assert_eq!(status, 400);
    assert!(body.contains("at least one step"), "{body}");
}

#[test]
fn a_bcc_only_step_also_goes_to_the_fallback_and_the_run_follows_its_mail() {
    let Some((lab, env)) = setup() else { return };
    create(
        &env,
        "workflow",
        json!({"name": "onboarding", "trigger": "user.created",
            "steps": [{"kind": "email", "subject": "Account {{ object.login }}", "text": "ready",
                       "to": ["{{ object.manager.mail }}"], "bcc": ["audit@example.org"]}]}),
    );
    // No manager: without the Fallback recipient only the auditors' Bcc copy would go.
    let out = post_event(&env, json!({"login": "eve"}), &[]);
    let run = &out["runs"][0];
    let note = run["steps"][0]["note"].as_str().unwrap();
    assert!(note.contains("sent to the Fallback recipient (and the Bcc recipients)"), "{note}");
    let id = delivered(&env, run)[0];
    let m = env.message(id);
    assert_eq!(m["used_fallback_recipient"], true, "{m:#}");
    assert_eq!(m["to"], json!(["ops@example.org"]));
    assert_eq!(lab.wait_for_messages(m["message_id"].as_str().unwrap(), 2, WAIT).len(), 2, "To and Bcc copies");
    // The run's mail follows its message: sent once it is delivered.
    let history = env.ok(&["workflow", "history", "onboarding", "--json"]).json();
    assert_eq!((history[0]["status"].as_str(), history[0]["delivery"].as_str()), (Some("queued"), Some("sent")));
    assert!(env.ok(&["workflow", "history", "onboarding"]).stdout.contains("steps queued, mail sent"));

    // A run none of whose steps could queue a message fails the command.
    create(
        &env,
        "workflow",
        json!({"name": "farewell", "trigger": "user.deleted",
            "steps": [{"kind": "email", "template": "welcome", "to": ["hr@example.org"]}]}),
    );
    let file = env.write("gone.json", r#"{"login": "eve"}"#);
    let failed = env.panel(&["event", "post", "user.deleted", "--data", file.to_str().unwrap()]);
    assert_eq!(failed.code, 1, "{}{}", failed.stdout, failed.stderr);
    assert!(failed.stdout.contains("steps failed, mail failed"), "{}", failed.stdout);

    // Every problem of a definition at once: a written-out bad address and a missing template.
    let bad = env.write(
        "bad.json",
        &json!({"name": "typo", "trigger": "user.created",
            "steps": [{"kind": "email", "template": "nope", "to": ["x@@y"]}]})
        .to_string(),
    );
    let refused = env.panel(&["workflow", "create", "--file", bad.to_str().unwrap()]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("steps[0].to[0]") && refused.stderr.contains("steps[0].template"),
        "{}",
        refused.stderr
    );
}
