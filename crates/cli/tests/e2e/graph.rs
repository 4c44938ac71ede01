//! Microsoft Graph (`transport = graph`) end to end: the `panel` binary, the token endpoint
//! double and an HTTPS Graph double that accepts only live Graph tokens with `Mail.Send`, for
//! the mailboxes of its access policy, and keeps the MIME it was given.

use std::time::{Duration, Instant};

use crate::common::*;
use mail_parser::MimeHeaders;
use panel_testlab::{GraphDouble, RecordingSink, TokenServer};
use serde_json::{Value, json};

const MAILBOX: &str = "panel@contoso.com";
const CLIENT_SECRET: &str = "client-Secret-3xT";
const WAIT: Duration = Duration::from_secs(30);

struct Lab {
    env: Env,
    tokens: TokenServer,
    graph: GraphDouble,
}

/// A tenant: its token endpoint, its Graph (whose access policy holds `MAILBOX`), and a licensed
/// installation with the Entra app's secret stored as `m365`.
fn tenant() -> Lab {
    let tokens = TokenServer::microsoft("client-1", CLIENT_SECRET, Duration::from_secs(3600));
    let graph = GraphDouble::start(&tokens, &[MAILBOX]);
    let env = Env::new();
    env.license();
    crate::oauth::store_microsoft(&env, CLIENT_SECRET);
    Lab { env, tokens, graph }
}

/// `tenant()` with Graph as the transport, sending as `mailbox`; a worker runs.
fn lab(mailbox: &str, extra: &[&str]) -> Lab {
    let Lab { mut env, tokens, graph } = tenant();
    use_graph(&env, &tokens, &graph, "m365", mailbox, extra);
    env.spawn(&["worker"]);
    Lab { env, tokens, graph }
}

/// Graph as the transport, through `tokens` and `graph`, with `credential`, sending as `mailbox`.
fn use_graph(env: &Env, tokens: &TokenServer, graph: &GraphDouble, credential: &str, mailbox: &str, extra: &[&str]) {
    let (token_url, graph_url, ca) = (tokens.url(), graph.url(), graph.ca_file.display().to_string());
    let mut set =
        vec!["smtp", "set", "--transport", "graph", "--oauth-provider", "microsoft", "--credential", credential];
    set.extend([
        "--username",
        mailbox,
        "--token-endpoint",
        &token_url,
        "--graph-endpoint",
        &graph_url,
        "--ca-file",
        &ca,
    ]);
    set.extend(["--from", "Identity Panel <panel@contoso.com>", "--fallback-recipient", "ops@contoso.com"]);
    set.extend(["--command-timeout", "5"]);
    set.extend(extra);
    env.ok(&set);
}

fn last_attempt(m: &Value) -> Value {
    m["attempts"].as_array().unwrap().last().unwrap().clone()
}

#[test]
fn the_test_message_and_a_workflows_mail_go_through_graph_as_the_mime_smtp_would_send() {
    let Lab { env, graph, .. } = lab(MAILBOX, &[]);
    let shown = env.ok(&["smtp", "show", "--json"]).json();
    assert_eq!(shown["effective"]["transport"], "graph");
    assert!(shown["effective"].get("host").is_none(), "no relay fields with graph: {shown:#}");

    // The check shows the token stage with the app's roles, and says what it cannot prove.
    let check = env.panel(&["smtp", "check", "--json"]);
    assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
    let report = check.json();
    let token = &report["stages"][0];
    assert_eq!(token["stage"], "token");
    let detail = token["detail"].as_str().unwrap();
    assert!(detail.contains("HTTP 200") && detail.contains("Mail.Send"), "{detail}");
    assert!(report["stages"][1]["detail"].as_str().unwrap().contains("Test Message proves it"), "{report:#}");

    let test = env.panel(&["smtp", "test", "--wait", "30", "--json"]);
    assert_eq!(test.code, 0, "{}{}", test.stdout, test.stderr);
    let id = test.json()["id"].as_i64().unwrap();
    let m = env.message(id);
    let attempt = last_attempt(&m);
    assert_eq!((attempt["stage"].as_str(), attempt["code"].as_i64()), (Some("data"), Some(202)), "{m:#}");
    let reply = attempt["reply"].as_str().unwrap();
    assert!(reply.contains("took the message for delivery") && reply.contains("request-id req-"), "{reply}");
    assert!(attempt["relay"].as_str().unwrap().starts_with("https://127.0.0.1:"), "{attempt:#}");
    let received = graph.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].mailbox, MAILBOX);
    assert!(received[0].mime.contains("Subject: Panel test message"), "{}", received[0].mime);

    // A workflow's mail with HTML, an attachment and a Bcc: the same MIME as over SMTP.
    let step = json!({"kind": "email", "subject": "Welcome {{ object.givenName }}", "text": "Hello {{ object.givenName }}",
        "html": "<p>Hello <b>{{ object.givenName }}</b></p>", "to": ["ann@contoso.com"], "bcc": ["audit@contoso.com"],
        "attachments": [{"filename": "account.csv", "content_type": "text/csv", "content": "login\n{{ object.login }}\n"}]});
    let wf = env.write("wf.json", &json!({"name": "welcome", "trigger": "user.created", "steps": [step]}).to_string());
    env.ok(&["workflow", "create", "--file", wf.to_str().unwrap()]);
    let event = env.write("ann.json", r#"{"givenName": "Ann", "login": "ann"}"#);
    env.ok(&["event", "post", "user.created", "--data", event.to_str().unwrap()]);
    let deadline = Instant::now() + WAIT;
    while graph.received().len() < 2 {
        assert!(Instant::now() < deadline, "the workflow's mail never reached Graph: {}", env.service_logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let over_graph = graph.received()[1].mime.clone();

    // The same draft over SMTP, to a recording sink.
    let sink = RecordingSink::start();
    let port = sink.port.to_string();
    env.ok(&["smtp", "set", "--transport", "smtp", "--host", "127.0.0.1", "--port", &port, "--security", "none"]);
    env.ok(&["event", "post", "user.created", "--data", event.to_str().unwrap()]);
    let over_smtp = sink.wait_for(1, WAIT).remove(0);
    let parse = |raw: &str| mail_parser::MessageParser::default().parse(raw.as_bytes()).expect("parses").into_owned();
    let (g, s) = (parse(&over_graph), parse(&over_smtp));
    assert_eq!(g.subject(), Some("Welcome Ann"));
    assert_eq!((g.subject(), g.from(), g.to()), (s.subject(), s.from(), s.to()));
    assert_eq!(g.body_text(0), s.body_text(0));
    assert_eq!(g.body_html(0), s.body_html(0));
    let attachment = |m: &mail_parser::Message| {
        let a = m.attachment(0).expect("an attachment");
        // Line ends as the reader shows them (the sink hands SMTP's back with LF).
        (a.attachment_name().map(String::from), a.text_contents().map(|t| t.replace("\r\n", "\n")))
    };
    assert_eq!(attachment(&g), (Some("account.csv".into()), Some("login\nann\n".into())));
    assert_eq!(attachment(&g), attachment(&s));
    // Graph has no envelope: the Bcc goes in the headers (Exchange removes it for recipients).
    assert!(g.bcc().is_some_and(|b| b.first().and_then(|a| a.address()) == Some("audit@contoso.com")), "{over_graph}");
    assert!(s.bcc().is_none(), "never in SMTP headers");
}

#[test]
fn graphs_refusals_are_named_with_their_fix_and_held_until_it_is_in() {
    // A mailbox outside the app's access policy: held as a configuration error, with the fix.
    let Lab { env, graph, tokens } = lab("other@contoso.com", &[]);
    let id = id_of(&env.ok(&["send", "--to", "ann@contoso.com", "--subject", "reset", "--text", "x", "--json"]));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "failed");
    let attempt = last_attempt(&m);
    assert_eq!(m["failure_class"], "configuration", "{m:#}");
    assert_eq!((attempt["stage"].as_str(), attempt["code"].as_i64()), (Some("graph"), Some(403)));
    assert!(attempt["reply"].as_str().unwrap().contains("ErrorAccessDenied"), "{attempt:#}");
    assert!(attempt["hint"].as_str().unwrap().contains("application access policy"), "{attempt:#}");
    let shown = env.ok(&["messages", "show", &id.to_string()]).stdout;
    assert!(shown.contains("request-id req-") && shown.contains("client-request-id "), "{shown}");

    // The fix (the right mailbox) releases it, and it is delivered.
    env.ok(&["smtp", "set", "--username", MAILBOX]);
    env.wait_message(id, WAIT, |m| m["state"] == "delivered");

    // A mailbox without an Exchange Online licence.
    graph.set_unlicensed("nolicence@contoso.com");
    env.ok(&["smtp", "set", "--username", "nolicence@contoso.com"]);
    let id = id_of(&env.ok(&["send", "--to", "ann@contoso.com", "--subject", "reset", "--text", "x", "--json"]));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "failed");
    let attempt = last_attempt(&m);
    assert_eq!(attempt["code"], 404);
    assert!(attempt["hint"].as_str().unwrap().contains("licence"), "{attempt:#}");
    env.ok(&["smtp", "set", "--username", MAILBOX]);
    env.wait_message(id, WAIT, |m| m["state"] == "delivered");

    // A message Graph refuses as it is (400): failed at once, not retried.
    graph.answer_next(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.", None);
    let id = id_of(&env.ok(&["send", "--to", "ann@contoso.com", "--subject", "bad", "--text", "x", "--json"]));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "failed");
    assert_eq!(m["failure_class"], "permanent", "{m:#}");
    assert_eq!(m["attempts"].as_array().unwrap().len(), 1);

    // An app whose token carries no Mail.Send: the check says so (RBAC for Applications could
    // still grant it in Exchange, out of the token's sight), and sending names both fixes.
    tokens.set_roles(&["User.Read.All"]);
    tokens.revoke_all();
    let check = env.panel(&["smtp", "check", "--json"]);
    let detail = check.json()["stages"][0]["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("Mail.Send is not among them") && detail.contains("RBAC for Applications"), "{detail}");
    let id = id_of(&env.ok(&["send", "--to", "ann@contoso.com", "--subject", "reset", "--text", "x", "--json"]));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "failed");
    assert_eq!((last_attempt(&m)["code"].as_i64(), m["failure_class"].as_str()), (Some(403), Some("configuration")));
    assert!(last_attempt(&m)["hint"].as_str().unwrap().contains("Mail.Send application permission"), "{m:#}");
    tokens.set_roles(&["Mail.Send"]);
    tokens.revoke_all();
    env.ok(&["messages", "retry", &id.to_string()]);
    env.wait_message(id, WAIT, |m| m["state"] == "delivered");

    // A revoked secret: the token stage fails with Entra's code and fix; nothing retried blindly.
    tokens.set_client_secret("a-new-secret-the-app-got");
    tokens.revoke_all();
    let id = id_of(&env.ok(&["send", "--to", "ann@contoso.com", "--subject", "reset", "--text", "x", "--json"]));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "failed");
    let attempt = last_attempt(&m);
    assert_eq!((attempt["stage"].as_str(), m["failure_class"].as_str()), (Some("token"), Some("configuration")));
    assert!(attempt["detail"].as_str().unwrap().contains("AADSTS7000215"), "{attempt:#}");
    assert!(attempt["hint"].as_str().unwrap().contains("panel credential set"), "{attempt:#}");
    assert_eq!(m["attempts"].as_array().unwrap().len(), 1, "held, not retried: {m:#}");
}

#[test]
fn throttled_by_graph_panel_waits_as_long_as_it_asks_then_delivers() {
    let Lab { env, graph, .. } = lab(MAILBOX, &["--retry-schedule", "1s"]);
    graph.answer_next(503, "ServiceUnavailable", "Service Unavailable", None);
    graph.answer_next(429, "TooManyRequests", "Application is over its MailboxConcurrency limit.", Some(2));
    let id = id_of(&env.ok(&["send", "--to", "ann@contoso.com", "--subject", "reset", "--text", "x", "--json"]));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    let attempts = m["attempts"].as_array().unwrap();
    assert_eq!((attempts[0]["code"].as_i64(), attempts[1]["code"].as_i64()), (Some(503), Some(429)), "{m:#}");
    assert!(attempts[..2].iter().all(|a| a["outcome"] == "temporary_failure"), "{m:#}");
    assert!(attempts[1]["hint"].as_str().unwrap().contains("Retry-After"), "{m:#}");
    let requests = graph.requests();
    assert_eq!(requests.len(), 3, "two refused, one accepted");
    let waited = requests[2] - requests[1];
    assert!(waited >= Duration::from_secs(2), "no request before the 2 s Graph asked for: {waited:?}");
}

#[test]
fn an_admin_moves_the_tenant_from_smtp_to_graph_in_the_web_ui() {
    let Some(b) = panel_testlab::Browser::start() else { return };
    let Lab { mut env, tokens, graph } = tenant();
    env.relay_on(panel_testlab::free_port(), &[]);
    crate::web_ui::account(&env, "ann", "admin");
    let port = env.serve();
    crate::web_ui::sign_in(&b, port, "ann");

    let hidden =
        |id: &str| b.script(&format!("return document.getElementById('{id}').closest('.field').hidden")) == json!(true);
    assert!(!hidden("f-host") && hidden("f-graph_endpoint") && hidden("graph-note"));
    b.select("#f-transport", "graph");
    assert!(hidden("f-host") && hidden("f-auth") && hidden("f-port"), "no relay fields for Graph");
    assert!(!hidden("f-username") && !hidden("f-credential") && !hidden("f-graph_endpoint") && !hidden("graph-note"));
    b.fill("#f-username", MAILBOX);
    b.fill("#f-credential", "m365");
    b.fill("#f-token_endpoint", &tokens.url());
    b.fill("#f-graph_endpoint", &graph.url());
    b.fill("#f-ca_file", &graph.ca_file.display().to_string());
    b.click(&b.find("#save"));
    let saved = b.wait_text("#settings-form [data-result]", 10, |t| t.starts_with("Saved"));
    assert!(saved.contains("host") && saved.contains("cleared"), "the relay's fields go, and it says so: {saved}");
    b.goto(&format!("http://127.0.0.1:{port}/settings"));
    b.wait_text("main > p", 10, |t| t.contains("Microsoft Graph") && t.contains(MAILBOX));

    b.click(&b.find("#check"));
    let stages = b.wait_text("#check-result", 20, |t| t.contains("Mail.Send"));
    assert!(stages.contains("gives the app a token") && stages.contains("Mail.Send"), "{stages}");
    b.click(&b.find("#test-message"));
    let status = b.wait_text("#test-status", 40, |t| t.starts_with("delivered") || t.contains("failed"));
    assert!(status.starts_with("delivered") && status.contains("202"), "{status}");
    assert_eq!(graph.received().len(), 1);

    // A mailbox outside the app's access policy: the message page shows Graph's words and the fix.
    env.ok(&["smtp", "set", "--username", "other@contoso.com"]);
    let id = id_of(&env.ok(&["send", "--to", "ann@contoso.com", "--subject", "reset", "--text", "x", "--json"]));
    env.wait_message(id, WAIT, |m| m["state"] == "failed");
    b.goto(&format!("http://127.0.0.1:{port}/messages/{id}"));
    let attempts = b.wait_text("#attempts", 10, |t| t.contains("403"));
    assert!(attempts.contains("ErrorAccessDenied") && attempts.contains("application access policy"), "{attempts}");
}

#[test]
fn an_app_that_proves_itself_with_a_certificate_sends_through_graph() {
    let dir = tempfile::tempdir().unwrap();
    let certificate = panel_testlab::EntraCertificate::create(dir.path());
    let tokens = TokenServer::microsoft_certificate("client-1", &certificate, Duration::from_secs(3600));
    let graph = GraphDouble::start(&tokens, &[MAILBOX]);
    let mut env = Env::new();
    env.license();
    let pem = env.write("app.pem", &certificate.pem);
    let set = |name: &str, file: &std::path::Path| {
        env.panel(&[
            "credential",
            "set",
            name,
            "--kind",
            "microsoft-certificate",
            "--client-id",
            "client-1",
            "--tenant",
            "contoso.onmicrosoft.com",
            "--key-file",
            file.to_str().unwrap(),
        ])
    };
    // A key without its certificate, or with another key's, is refused at once.
    let other = panel_testlab::EntraCertificate::create(&env.path().join("."));
    let (key_only, _) = certificate.pem.split_at(certificate.pem.find("-----BEGIN CERTIFICATE").unwrap());
    let mismatched = key_only.to_string() + &other.pem[other.pem.find("-----BEGIN CERTIFICATE").unwrap()..];
    for (bad, why) in [(key_only.to_string(), "no PEM certificate"), (mismatched, "does not belong to the private key")]
    {
        let r = set("broken", &env.write("bad.pem", &bad));
        assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(why), "{}", r.stderr);
    }
    let r = set("m365cert", &pem);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let listed = env.ok(&["credential", "list", "--json"]).stdout;
    assert!(listed.contains("thumbprint_sha256") && !listed.contains("PRIVATE KEY"), "{listed}");

    use_graph(&env, &tokens, &graph, "m365cert", MAILBOX, &[]);
    env.spawn(&["worker"]);
    let test = env.panel(&["smtp", "test", "--wait", "30", "--json"]);
    assert_eq!(test.code, 0, "{}{}\n{}", test.stdout, test.stderr, env.service_logs());
    assert_eq!(graph.received().len(), 1);
    assert_eq!(tokens.issued(), 1, "the token came from a verified client assertion");
}
