//! OAuth2 (XOAUTH2) end to end: the `panel` binary, a token endpoint and an SMTP server on
//! loopback that accepts only live tokens that endpoint issued.

use std::time::Duration;

use crate::common::*;
use panel_testlab::{ServiceAccount, TokenServer, XOAuthSmtp};

const MAILBOX: &str = "panel@contoso.com";
const CLIENT_SECRET: &str = "client-Secret-3xT";

fn state(m: &serde_json::Value) -> &str {
    m["state"].as_str().unwrap()
}

pub(crate) fn store_microsoft(env: &Env, secret: &str) {
    let args = [
        "credential",
        "set",
        "m365",
        "--kind",
        "microsoft-client-secret",
        "--client-id",
        "client-1",
        "--tenant",
        "contoso.onmicrosoft.com",
        "--secret-stdin",
    ];
    let r = env.panel_stdin(&args, secret);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

fn configure(env: &Env, smtp: &XOAuthSmtp, tokens: &TokenServer, provider: &str, credential: &str) {
    let port = smtp.port.to_string();
    let url = tokens.url();
    env.ok(&[
        "smtp",
        "set",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--security",
        "none",
        "--allow-plaintext-auth",
        "true",
        "--from",
        "Identity Panel <panel@contoso.com>",
        "--fallback-recipient",
        "ops@contoso.com",
        "--auth",
        "oauth2",
        "--oauth-provider",
        provider,
        "--credential",
        credential,
        "--username",
        MAILBOX,
        "--token-endpoint",
        &url,
        "--command-timeout",
        "5",
    ]);
}

fn microsoft(lifetime: Duration) -> (Env, TokenServer, XOAuthSmtp) {
    let tokens = TokenServer::microsoft("client-1", CLIENT_SECRET, lifetime);
    let smtp = XOAuthSmtp::start(&tokens, MAILBOX);
    let env = Env::new();
    env.license();
    store_microsoft(&env, CLIENT_SECRET);
    configure(&env, &smtp, &tokens, "microsoft", "m365");
    (env, tokens, smtp)
}

#[test]
fn microsoft_tokens_deliver_are_cached_and_a_revoked_one_is_refreshed_once() {
    let (mut env, tokens, smtp) = microsoft(Duration::from_secs(3600));
    let check = env.panel(&["smtp", "check", "--json"]);
    assert_eq!(check.code, 0, "{}", check.stdout);
    let report = check.json();
    let stages: Vec<&str> = report["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["dns", "tcp", "greeting", "ehlo", "token", "auth", "mail", "rcpt", "quit"]);
    let token_stage = &report["stages"][4]["detail"];
    let detail = token_stage.as_str().unwrap();
    assert!(detail.contains(&tokens.url()) && detail.contains("HTTP 200") && detail.contains("expires at"), "{detail}");
    assert_eq!(report["auth_mechanisms"], serde_json::json!(["XOAUTH2"]));
    assert_eq!(tokens.issued(), 1);

    env.spawn(&["worker"]);
    assert_eq!(state(&env.ok(&["smtp", "test", "--wait", "20", "--json"]).json()), "delivered");
    assert_eq!(tokens.issued(), 2, "the service fetched its own token");
    smtp.wait_until_idle(Duration::from_secs(10)); // past idle_connection: a new connection
    assert_eq!(state(&env.ok(&["smtp", "test", "--wait", "20", "--json"]).json()), "delivered");
    assert_eq!(tokens.issued(), 2, "the cached token was reused");

    tokens.revoke_all();
    smtp.wait_until_idle(Duration::from_secs(10));
    assert_eq!(state(&env.ok(&["smtp", "test", "--wait", "20", "--json"]).json()), "delivered");
    assert_eq!(smtp.rejections(), 1, "one rejected token");
    assert_eq!(tokens.issued(), 3, "then exactly one refresh");
    assert_eq!(smtp.received().len(), 3);
}

#[test]
fn short_lived_tokens_are_refreshed_before_they_expire() {
    let (mut env, tokens, smtp) = microsoft(Duration::from_secs(2));
    env.spawn(&["worker"]);
    assert_eq!(state(&env.ok(&["smtp", "test", "--wait", "20", "--json"]).json()), "delivered");
    // The token is used at AUTH: once the idle connection is closed (after 1 s), the next message
    // authenticates again, with the token past half its 2 s lifetime.
    smtp.wait_until_idle(Duration::from_secs(10));
    assert_eq!(state(&env.ok(&["smtp", "test", "--wait", "20", "--json"]).json()), "delivered");
    assert_eq!(tokens.issued(), 2);
    assert_eq!(smtp.rejections(), 0, "the stale token was replaced before use, not after a rejection");
}

#[test]
fn a_wrong_client_secret_shows_the_providers_error_and_the_fix_resends() {
    let tokens = TokenServer::microsoft("client-1", CLIENT_SECRET, Duration::from_secs(3600));
    let smtp = XOAuthSmtp::start(&tokens, MAILBOX);
    let mut env = Env::new();
    env.license();
    store_microsoft(&env, "wrong-secret");
    configure(&env, &smtp, &tokens, "microsoft", "m365");

    let check = env.panel(&["smtp", "check", "--json"]);
    assert_eq!(check.code, 1);
    let failure = &check.json()["failure"];
    assert_eq!(failure["stage"], "token");
    assert_eq!(failure["class"], "configuration");
    let detail = failure["detail"].as_str().unwrap();
    assert!(
        detail.contains("HTTP 401") && detail.contains("AADSTS7000215: Invalid client secret provided."),
        "{detail}"
    );
    assert!(failure["hint"].as_str().unwrap().contains("panel credential set"));

    env.spawn(&["worker"]);
    let m = env.panel(&["smtp", "test", "--wait", "20", "--json"]).json();
    assert_eq!(state(&m), "failed", "{m:#}");
    assert_eq!(m["failure_class"], "configuration");
    assert!(m["last_error"].as_str().unwrap().contains("AADSTS7000215"), "{m:#}");

    // Storing the right secret re-queues the held message.
    store_microsoft(&env, CLIENT_SECRET);
    env.wait_message(m["id"].as_i64().unwrap(), Duration::from_secs(30), |m| state(m) == "delivered");
    assert_eq!(smtp.received().len(), 1);
}

#[test]
fn google_service_account_delegation_delivers_as_the_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let account = ServiceAccount::create(dir.path(), "https://oauth2.googleapis.com/token");
    let tokens = TokenServer::google(&account, Duration::from_secs(3600));
    let smtp = XOAuthSmtp::start(&tokens, MAILBOX);
    let mut env = Env::new();
    env.license();
    let key = env.write("service-account.json", &account.key_json);
    env.ok(&["credential", "set", "gws", "--kind", "google-service-account", "--key-file", key.to_str().unwrap()]);
    let listed = env.ok(&["credential", "list", "--json"]).json();
    assert_eq!(listed[0]["username"], account.client_email.as_str());
    assert_eq!(listed[0]["attributes"]["token_uri"], "https://oauth2.googleapis.com/token");
    configure(&env, &smtp, &tokens, "google", "gws");
    env.spawn(&["worker"]);
    let m = env.ok(&["smtp", "test", "--wait", "20", "--json"]).json();
    assert_eq!(state(&m), "delivered", "{m:#}");
    assert_eq!(tokens.issued(), 1);
    assert_eq!(smtp.received().len(), 1);

    // A password credential cannot stand in for a service account key.
    let r = env.panel_stdin(&["credential", "set", "pw", "--username", "u", "--password-stdin"], "x");
    assert_eq!(r.code, 0);
    let r = env.panel(&["smtp", "set", "--credential", "pw"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("'pw' is a password credential, but auth = oauth2 needs a google-service-account"),
        "{}",
        r.stderr
    );
    // And a key file that is not one is refused before anything is stored.
    let bad = env.write("bad.json", r#"{"client_email": "x@y", "private_key": "not a key"}"#);
    let r = env.panel(&[
        "credential",
        "set",
        "bad",
        "--kind",
        "google-service-account",
        "--key-file",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not a PEM PKCS#8 private key"), "{}", r.stderr);
}

#[test]
fn a_token_the_relay_keeps_refusing_fails_as_configuration_after_exactly_one_refresh() {
    let tokens = TokenServer::microsoft("client-1", CLIENT_SECRET, Duration::from_secs(3600));
    // The relay lets only another mailbox send: every token is refused, as without SendAsApp.
    let smtp = XOAuthSmtp::start(&tokens, "someone-else@contoso.com");
    let env = Env::new();
    env.license();
    store_microsoft(&env, CLIENT_SECRET);
    configure(&env, &smtp, &tokens, "microsoft", "m365");
    let check = env.panel(&["smtp", "check", "--json"]);
    assert_eq!(check.code, 1);
    let report = check.json();
    let failure = &report["failure"];
    assert_eq!((failure["stage"].as_str(), failure["class"].as_str()), (Some("auth"), Some("configuration")));
    assert_eq!(failure["code"], 535);
    let detail = failure["detail"].as_str().unwrap();
    assert!(detail.contains("rejected the OAuth2 token for panel@contoso.com"), "{detail}");
    assert!(detail.contains(&tokens.url()) && detail.contains("HTTP 200"), "the provider's side too: {detail}");
    assert!(failure["hint"].as_str().unwrap().contains("SMTP.SendAsApp"), "{failure}");
    assert_eq!((tokens.issued(), smtp.rejections()), (2, 2), "one refresh, then give up");
}
