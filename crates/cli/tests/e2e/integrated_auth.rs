//! Integrated authentication against real components on loopback: an MIT Kerberos KDC for the
//! test realm, and the Postfix lab with Cyrus SASL's GSSAPI and NTLM mechanisms (like an
//! Exchange relay). Panel authenticates with its own Kerberos identity (a keytab, or the
//! default credential cache after kinit), or with NTLM and a stored credential.

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use panel_testlab::Kdc;

const WAIT: Duration = Duration::from_secs(30);
const PANEL_PRINCIPAL: &str = "panel/localhost@PANEL.TEST";

fn setup() -> Option<(Kdc, PostfixLab, Env)> {
    let kdc = Kdc::start()?;
    let lab = PostfixLab::start_exchange_like(&kdc)?;
    let mut env = Env::new();
    env.vars.push(("KRB5_CONFIG".into(), kdc.krb5_conf.display().to_string()));
    // No ambient ticket: each test says where its credentials come from.
    env.vars.push(("KRB5CCNAME".into(), format!("FILE:{}", kdc.path("none.ccache").display())));
    Some((kdc, lab, env))
}

fn integrated(env: &Env, lab: &PostfixLab, extra: &[&str]) {
    let mut args = vec!["--auth", "integrated", "--service-principal", "smtp/localhost"];
    args.extend(extra);
    env.configure(lab, lab.submission_port, "starttls", &args);
}

fn check(env: &Env) -> (i32, serde_json::Value) {
    let r = env.panel(&["smtp", "check", "--json"]);
    (r.code, r.json())
}

#[test]
fn a_keytab_authenticates_with_gssapi_and_the_maildir_shows_the_principal() {
    let Some((kdc, lab, mut env)) = setup() else { return };
    let keytab = kdc.keytab("panel/localhost");
    integrated(&env, &lab, &["--keytab", keytab.to_str().unwrap(), "--principal", PANEL_PRINCIPAL]);
    let (code, report) = check(&env);
    assert_eq!(code, 0, "{report:#}\nKDC log:\n{}\nPostfix log:\n{}", kdc.log(), lab.log());
    let mechanisms = report["auth_mechanisms"].to_string();
    assert!(
        mechanisms.contains("GSSAPI") && mechanisms.contains("NTLM"),
        "smtp check shows the mechanisms: {mechanisms}"
    );
    assert!(
        report["stages"].to_string().contains("authenticated with Kerberos as panel/localhost@PANEL.TEST"),
        "{report:#}"
    );

    env.spawn(&["worker"]);
    let m = env.ok(&["smtp", "test", "--wait", "20", "--json"]).json();
    assert_eq!(m["state"], "delivered", "{m:#}");
    let mail = &lab.wait_for_messages(m["message_id"].as_str().unwrap(), 1, WAIT)[0];
    assert!(mail.contains("(Authenticated sender: panel/localhost"), "{mail}");
    assert!(lab.log().contains("sasl_method=GSSAPI"), "{}", lab.log());
    let shown = env.ok(&["smtp", "show", "--json"]).stdout;
    assert!(shown.contains("\"auth\": \"integrated\"") && shown.contains("smtp/localhost"), "{shown}");
}

#[test]
fn the_default_credential_cache_works_after_kinit_and_no_ticket_is_named() {
    let Some((kdc, lab, mut env)) = setup() else { return };
    let keytab = kdc.keytab("panel/localhost");
    integrated(&env, &lab, &[]);
    let (code, report) = check(&env);
    assert_eq!(code, 1, "{report:#}");
    let failure = report["failure"].to_string();
    assert!(failure.contains("no ticket") && failure.contains("kinit"), "{failure}");
    assert_eq!(report["failure"]["class"], "configuration");

    let cache = kdc.path("panel.ccache");
    let status = Command::new("kinit")
        .args(["-k", "-t", keytab.to_str().unwrap(), PANEL_PRINCIPAL])
        .env("KRB5_CONFIG", &kdc.krb5_conf)
        .env("KRB5CCNAME", format!("FILE:{}", cache.display()))
        .status()
        .expect("kinit runs");
    assert!(status.success());
    env.vars.retain(|(k, _)| k != "KRB5CCNAME");
    env.vars.push(("KRB5CCNAME".into(), format!("FILE:{}", cache.display())));
    let (code, report) = check(&env);
    assert_eq!(code, 0, "{report:#}");
    env.spawn(&["worker"]);
    let m = env.ok(&["smtp", "test", "--wait", "20", "--json"]).json();
    assert_eq!(m["state"], "delivered", "{m:#}");
}

#[test]
fn a_wrong_principal_or_unreadable_keytab_names_the_cause() {
    let Some((kdc, lab, env)) = setup() else { return };
    let keytab = kdc.keytab("panel/localhost");
    let kt = keytab.to_str().unwrap();
    env.configure(
        &lab,
        lab.submission_port,
        "starttls",
        &[
            "--auth",
            "integrated",
            "--keytab",
            kt,
            "--principal",
            PANEL_PRINCIPAL,
            "--service-principal",
            "smtp/nosuch.panel.test",
        ],
    );
    let (code, report) = check(&env);
    assert_eq!(code, 1);
    let failure = report["failure"].to_string();
    assert!(failure.contains("unknown to the KDC") && failure.contains("smtp/nosuch.panel.test"), "{failure}");

    integrated(&env, &lab, &["--keytab", "/nonexistent/panel.keytab", "--principal", PANEL_PRINCIPAL]);
    let (code, report) = check(&env);
    assert_eq!(code, 1);
    assert!(report["failure"].to_string().contains("keytab"), "{report:#}");

    integrated(&env, &lab, &["--keytab", kt, "--principal", "nobody@PANEL.TEST"]);
    let (code, report) = check(&env);
    assert_eq!(code, 1);
    let failure = report["failure"].to_string();
    assert!(failure.contains("keytab") || failure.contains("principal"), "{failure}");

    // A relay that does not offer GSSAPI says so.
    let Some(plain_lab) = PostfixLab::start() else { return };
    integrated(&env, &plain_lab, &["--keytab", kt, "--principal", PANEL_PRINCIPAL]);
    let (code, report) = check(&env);
    assert_eq!(code, 1);
    let failure = report["failure"].to_string();
    assert!(failure.contains("offers AUTH PLAIN LOGIN but not GSSAPI"), "{failure}");
}

#[test]
fn ntlm_with_a_stored_credential_delivers_and_a_wrong_password_is_a_configuration_error() {
    let Some((_kdc, lab, mut env)) = setup() else { return };
    env.license();
    env.store_lab_credential("exchange");
    env.configure(&lab, lab.submission_port, "starttls", &["--auth", "ntlm", "--credential", "exchange"]);
    let (code, report) = check(&env);
    assert_eq!(code, 0, "{report:#}\n{}", lab.log());
    env.spawn(&["worker"]);
    let m = env.ok(&["smtp", "test", "--wait", "20", "--json"]).json();
    assert_eq!(m["state"], "delivered", "{m:#}");
    let mail = &lab.wait_for_messages(m["message_id"].as_str().unwrap(), 1, WAIT)[0];
    assert!(mail.contains("(Authenticated sender: panel"), "{mail}");
    assert!(lab.log().contains("sasl_method=NTLM"), "NTLM, not PLAIN: {}", lab.log());

    let r = env
        .panel_stdin(&["credential", "set", "exchange", "--username", LAB_USER, "--password-stdin"], "wrong-password");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = env.panel(&["smtp", "test", "--wait", "20", "--json"]);
    assert_eq!(r.code, 1, "not delivered");
    let m = r.json();
    assert_eq!(m["state"], "failed", "{m:#}");
    assert_eq!(m["failure_class"], "configuration", "{m:#}");
    let attempt = &m["attempts"][0];
    assert_eq!(attempt["stage"], "auth");
    assert_eq!(attempt["code"], 535, "the relay's reply is shown: {attempt}");
}
