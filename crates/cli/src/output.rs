//! What the CLI prints: a readable text by default, the same data as JSON with `--json`.

use chrono::{DateTime, SecondsFormat, Utc};
use panel_domain::RelaySettings;
use panel_relay::CheckReport;
use panel_service::SettingsUpdate;
use panel_service::licensing::LicenseStatus;
use panel_service::ops::effective_view;
use panel_service::vault::CredentialInfo;
use panel_service::views::{AuditEntry, MessageDetail, MessageSummary, Service, SettingsVersion, StoredSettings};
use serde_json::json;

pub fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

pub fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn settings_saved(u: &SettingsUpdate, json: bool) {
    if json {
        print_json(&json!({"version": u.version, "effective": effective_view(&u.settings), "notices": u.notices}));
    } else {
        println!("Relay settings saved as version {}. Running services use them for the next message.", u.version);
        print_effective(&u.settings);
        for n in &u.notices {
            println!("Note: {n}");
        }
    }
}

pub fn settings(stored: &StoredSettings, effective: Option<&RelaySettings>, json: bool) {
    if json {
        print_json(&json!({
            "version": stored.version,
            "saved_at": stored.saved_at,
            "saved_by": stored.saved_by,
            "stored": stored.doc,
            "effective": effective.map(effective_view),
        }));
        return;
    }
    println!("Relay settings version {} (saved {} by {})", stored.version, time(&stored.saved_at), stored.saved_by);
    match effective {
        Some(s) => print_effective(s),
        None => println!("  (the stored settings are invalid; run `panel smtp set` to fix them)"),
    }
}

pub fn settings_history(versions: &[SettingsVersion], json: bool) {
    if json {
        print_json(&json!({ "versions": versions }));
        return;
    }
    if versions.is_empty() {
        println!("No relay settings saved yet.");
        return;
    }
    for v in versions {
        let mark = if v.in_force { "  (in force)" } else { "" };
        println!("Version {} saved {} by {}{mark}", v.version, time(&v.saved_at), v.saved_by);
        if v.changes.is_empty() {
            println!("  (no field changed)");
        }
        for c in &v.changes {
            println!("  {c}");
        }
    }
    println!("Restore one with: panel smtp restore VERSION");
}

fn print_effective(s: &RelaySettings) {
    let view = effective_view(s);
    print_fields(&view, "  ");
    if let Some(serde_json::Value::Array(routes)) = view.get("routes") {
        println!("  Standby routes, tried in this order when the ones before fail:");
        for r in routes {
            println!("    route {}", r["name"].as_str().unwrap_or_default());
            print_fields(&r["settings"], "      ");
        }
    }
    if let Some(notice) = s.policy.notice() {
        println!("Note: {notice}");
    }
}

fn print_fields(view: &serde_json::Value, indent: &str) {
    for (key, value) in view.as_object().into_iter().flatten() {
        let shown = match value {
            serde_json::Value::Null | serde_json::Value::Array(_) => continue,
            serde_json::Value::String(v) => v.clone(),
            other => other.to_string(),
        };
        println!("{indent}{key:<22} {shown}");
    }
}

pub fn check(r: &CheckReport, json: bool) {
    if json {
        print_json(r);
        return;
    }
    check_route(r, !r.standby.is_empty());
    for standby in &r.standby {
        check_route(standby, true);
    }
    if !r.standby.is_empty() {
        match &r.in_use {
            Some(route) if *route == r.route => println!("In use: route {route} (the primary passes)."),
            Some(route) => println!("In use: route {route}, the first that passes; the routes before it fail."),
            None => println!("In use: none; every route fails, so messages wait and are retried."),
        }
    }
    if r.released > 0 {
        println!("  {} message(s) held by a configuration error are sent again now.", r.released);
    }
}

/// One route's check, stage by stage.
fn check_route(r: &CheckReport, named: bool) {
    let graph = r.transport == "graph";
    let route = if named { format!("route {}: ", r.route) } else { String::new() };
    match graph {
        true => println!("{route}Checking Microsoft Graph at {}, from {}", r.relay, r.ran_in),
        false => println!("{route}Checking relay {} (security {}), from {}", r.relay, r.security, r.ran_in),
    }
    for e in &r.stages {
        let mark = if e.ok { "ok  " } else { "FAIL" };
        println!("  {mark} {:<9} {}", e.stage.to_string(), e.detail.replace('\n', " "));
    }
    if let Some(tls) = &r.tls {
        println!("  TLS:");
        for (k, v) in [
            ("protocol", &tls.protocol),
            ("cipher", &tls.cipher_suite),
            ("subject", &tls.subject),
            ("issuer", &tls.issuer),
            ("expires", &tls.not_after),
            ("sha256", &tls.sha256),
            ("verification", &tls.verification),
        ] {
            if !v.is_empty() {
                println!("    {k:<13} {v}");
            }
        }
    }
    if !r.auth_mechanisms.is_empty() {
        println!("  AUTH offered: {}", r.auth_mechanisms.join(" "));
    }
    match &r.failure {
        None => match graph {
            true => {
                println!("Result: OK, the app gets a Graph token; `panel smtp test` proves it may send as the mailbox.")
            }
            false => println!("Result: OK, the relay would accept a message to the Fallback recipient."),
        },
        Some(f) => {
            println!("Result: FAILED at {} ({})", f.stage, class_name(f.class));
            println!("  {}", f.detail.replace('\n', " "));
            if let Some(h) = &f.hint {
                println!("  hint: {h}");
            }
        }
    }
}

fn class_name(c: panel_domain::FailureClass) -> &'static str {
    match c {
        panel_domain::FailureClass::Transient => "temporary; messages are retried",
        panel_domain::FailureClass::Permanent => "permanent",
        panel_domain::FailureClass::Configuration => "configuration error",
        panel_domain::FailureClass::Internal => "internal error in Panel; messages are retried",
    }
}

pub fn no_service_notice() {
    println!(
        "No Panel Service or worker is running (no heartbeat in the last 10 s). The message stays queued \
         and is sent as soon as one starts: `panel serve` or `panel worker`."
    );
}

pub fn enqueued(id: i64, what: &str, service_running: bool, json: bool) {
    if json {
        print_json(&json!({"id": id, "state": "queued", "service_running": service_running}));
        return;
    }
    println!("{what} {id} queued. Follow it with: panel messages show {id}");
    if !service_running {
        no_service_notice();
    }
}

/// Each recipient refused for good, with the relay's reply.
fn print_refused(m: &MessageDetail, indent: &str) {
    for r in m.recipients.iter().filter(|r| r.state == panel_domain::RecipientState::Failed) {
        println!("{indent}{}: {}", r.address, r.reply.as_deref().unwrap_or("(no reply recorded)"));
    }
}

pub fn outcome(m: &MessageDetail, service_running: bool, json: bool) {
    if json {
        print_json(m);
        return;
    }
    let last = m.attempts.iter().rev().find(|a| a.outcome != panel_domain::AttemptOutcome::Interrupted);
    match (m.state, last) {
        (panel_domain::MessageState::Delivered, Some(a)) => {
            println!(
                "Delivered to {} by {}{}: {}",
                m.to.join(", "),
                a.relay,
                a.route.as_deref().map(|r| format!(" (route {r})")).unwrap_or_default(),
                reply_line(a.code, &a.enhanced_code, &a.reply, &a.detail)
            );
        }
        (panel_domain::MessageState::PartlyFailed, _) => {
            let delivered = m.recipients.iter().filter(|r| r.state == panel_domain::RecipientState::Delivered).count();
            println!("Partly delivered: {delivered} of {} recipients; refused for good:", m.recipients.len());
            print_refused(m, "  ");
            println!("  retry sends to these only: panel messages retry {}", m.id);
        }
        (_, Some(a)) => {
            println!("Not delivered ({}): {} at {}", m.state, a.outcome.as_str().replace('_', " "), a.stage);
            // Only a reply is the relay's words; a refused connection or Panel's own failure is not.
            if a.stage.is_inside_panel() {
                println!("  Panel itself, not the relay: {}", a.detail);
            } else if a.code.is_some() {
                println!("  relay {} said: {}", a.relay, reply_line(a.code, &a.enhanced_code, &a.reply, &a.detail));
            } else {
                println!("  relay {}: {}", a.relay, a.detail);
            }
            if let Some(h) = &a.hint {
                println!("  hint: {h}");
            }
            if m.recipients.iter().filter(|r| r.state == panel_domain::RecipientState::Failed).count() > 1 {
                println!("  refused for good:");
                print_refused(m, "    ");
            }
            if let Some(next) = &m.next_attempt_at {
                println!("  next attempt at {}", time(next));
            }
        }
        (state, None) => {
            println!("Still {state}: no attempt yet.");
            if !service_running {
                no_service_notice();
            }
        }
    }
}

fn reply_line(code: Option<i64>, enhanced: &Option<String>, reply: &Option<String>, detail: &str) -> String {
    match (code, reply) {
        (Some(c), Some(r)) => {
            let e = enhanced.as_deref().map(|e| format!("{e} ")).unwrap_or_default();
            format!("{c} {e}{}", r.replace('\n', " "))
        }
        _ => detail.to_string(),
    }
}

pub fn message_list(list: &[MessageSummary], json: bool) {
    if json {
        print_json(&list);
        return;
    }
    if list.is_empty() {
        println!("No messages.");
        return;
    }
    println!("{:>6}  {:<10}  {:<12}  {:<24}  {:<30}  SUBJECT / LAST ERROR", "ID", "STATE", "ORIGIN", "CREATED", "TO");
    for m in list {
        let to = m.to.join(",");
        let to = if to.len() > 30 { format!("{}...", &to[..to.floor_char_boundary(27)]) } else { to };
        let tail = m
            .last_error
            .clone()
            .filter(|_| m.state != panel_domain::MessageState::Delivered)
            .unwrap_or_else(|| m.subject.clone());
        println!(
            "{:>6}  {:<10}  {:<12}  {:<24}  {:<30}  {}",
            m.id,
            m.state.as_str(),
            m.origin.as_str(),
            time(&m.created_at),
            to,
            tail
        );
    }
}

pub fn message(m: &MessageDetail, json: bool) {
    if json {
        print_json(m);
        return;
    }
    println!("Message {}  {}  (origin {}, priority {})", m.id, m.state, m.origin, m.priority);
    println!("  From:       {}", m.from);
    let fallback =
        if m.used_fallback_recipient { "   (Fallback recipient: the message named no recipient)" } else { "" };
    println!("  To:         {}{fallback}", m.to.join(", "));
    if !m.cc.is_empty() {
        println!("  Cc:         {}", m.cc.join(", "));
    }
    if !m.bcc.is_empty() {
        println!("  Bcc:        {}", m.bcc.join(", "));
    }
    println!("  Subject:    {}", m.subject);
    println!("  Message-ID: {}", m.message_id);
    println!("  Created:    {}", time(&m.created_at));
    if let Some(n) = &m.next_attempt_at {
        println!("  Next try:   {}", time(n));
    }
    if let Some(e) = &m.last_error {
        println!("  Last error: {e}");
    }
    if m.failure_class == Some(panel_domain::FailureClass::Configuration) {
        println!(
            "  (configuration error: held, and sent again by itself once the fix is in — settings, credential, license, password file, or a passing `panel smtp check` — or now with `panel messages retry {}`)",
            m.id
        );
    }
    println!("  Recipients:");
    for r in &m.recipients {
        let decided = r.decided_by.map(|n| format!("attempt {n}")).unwrap_or_default();
        let state = match (r.state, m.state) {
            (panel_domain::RecipientState::Pending, panel_domain::MessageState::Failed) => "held".to_string(),
            (panel_domain::RecipientState::Pending, panel_domain::MessageState::Cancelled) => "cancelled".to_string(),
            (s, _) => s.to_string(),
        };
        println!(
            "    {:<3} {:<32} {:<9} {:<10} {}",
            r.kind,
            r.address,
            state,
            decided,
            r.reply.as_deref().unwrap_or("")
        );
    }
    println!("  Attempts:");
    if m.attempts.is_empty() {
        println!("    none yet");
    }
    for (i, a) in m.attempts.iter().enumerate() {
        println!(
            "    {}. {}  {}  relay {}{}  {} at {}: {}",
            i + 1,
            time(&a.at),
            a.outcome,
            if a.relay.is_empty() { "-" } else { &a.relay },
            a.route.as_deref().map(|r| format!(" (route {r})")).unwrap_or_default(),
            if a.stage.is_inside_panel() {
                "Panel's own failure (not the relay's)"
            } else if a.code.is_some() {
                "reply"
            } else {
                "failure"
            },
            a.stage,
            reply_line(a.code, &a.enhanced_code, &a.reply, &a.detail)
        );
        if let Some(h) = &a.hint {
            println!("       hint: {h}");
        }
    }
    if !m.bounces.is_empty() {
        println!("  After the relay's 250:");
        for b in &m.bounces {
            let after = m.attempts.last().map(|a| b.received_at - a.finished_at);
            println!("    {}", bounce_line(b, after));
        }
    }
}

/// One received report in words: "bounced by mx.example.net: 550 5.1.1 user unknown (bob@...),
/// 3 minutes after the relay accepted it".
fn bounce_line(b: &panel_service::views::Bounce, after: Option<chrono::TimeDelta>) -> String {
    let what = match b.kind.as_str() {
        "failed" => "bounced",
        "delayed" => "delayed",
        "auto_reply" => "automatic reply (not a bounce)",
        "delivered" => "reported delivered",
        _ => "report",
    };
    let by = b.remote_mta.as_deref().or(b.reporting_mta.as_deref()).map(|m| format!(" by {m}")).unwrap_or_default();
    let said = b.diagnostic.as_deref().or(b.status.as_deref()).map(|d| format!(": {d}")).unwrap_or_default();
    let who = b.recipient.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
    let when = match after {
        Some(d) if d.num_seconds() >= 0 => {
            format!(
                ", {} after the relay accepted it",
                panel_domain::duration::format(std::time::Duration::from_secs(d.num_seconds() as u64))
            )
        }
        _ => String::new(),
    };
    let note = b.reason.as_deref().map(|r| format!(" [{r}]")).unwrap_or_default();
    format!("{} {what}{by}{said}{who}{when}{note}", time(&b.received_at))
}

/// The received reports, newest first (`panel bounces list`).
pub fn bounces(list: &[panel_service::views::Bounce], json: bool) {
    if json {
        print_json(&list);
        return;
    }
    if list.is_empty() {
        println!("No reports received.");
        return;
    }
    for b in list {
        let about = match b.message_id {
            Some(id) => format!("message {id}"),
            None => "unmatched".to_string(),
        };
        println!("{about:<14} {}  to {}  subject: {}", bounce_line(b, None), b.envelope_to, b.subject);
    }
}

pub fn services(list: &[Service], json: bool) {
    if json {
        print_json(&list);
        return;
    }
    if list.is_empty() {
        println!("No Panel Service or worker is running (no heartbeat in the last 10 s).");
        return;
    }
    println!(
        "{:<8} {:<20} {:>8} {:<8} {:<24} {:<24} LISTEN",
        "KIND", "HOST", "PID", "VERSION", "STARTED", "LAST HEARTBEAT"
    );
    for s in list {
        let i = s;
        println!(
            "{:<8} {:<20} {:>8} {:<8} {:<24} {:<24} {}",
            i.kind,
            i.host,
            i.pid,
            i.version,
            time(&i.started_at),
            time(&s.heartbeat_at),
            i.listen.as_deref().unwrap_or("-")
        );
        // What it runs with, under its line: what an admin compares with the file on disk.
        println!("         config file: {}", i.config_file.as_deref().unwrap_or("none (defaults and environment)"));
        let trusted = if i.authorities.is_empty() { "none".to_string() } else { i.authorities.join(", ") };
        println!("         trusts license authorities: {trusted}");
        if let Some(note) = &i.config_note {
            println!("         {note}");
        }
    }
}

pub fn licenses(list: &[LicenseStatus], json: bool) {
    if json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("No license keys. Add one with: panel license add KEY");
        return;
    }
    for l in list {
        let status = match &l.problem {
            None => "valid".to_string(),
            Some(p) => format!("NOT VALID: {p}"),
        };
        println!("{}  {status}", l.id);
        if let Some(org) = &l.organization {
            let domain = l.domain.as_deref().map(|d| format!(" (domain {d})")).unwrap_or_default();
            println!("  issued to   {org}{domain}{}", if l.trial { ", trial" } else { "" });
        }
        if !l.features.is_empty() {
            println!("  features    {}", l.features.join(", "));
        }
        if let Some(at) = &l.issued_at {
            println!("  issued      {}", time(at));
        }
        // An unverified key's expiry is unknown, not "never".
        if l.verified {
            println!("  expires     {}", l.expires_at.as_ref().map_or_else(|| "never".to_string(), time));
        }
        if let Some(a) = &l.authority {
            println!("  authority   {a}");
        }
        println!("  added       {} by {}", time(&l.added_at), l.added_by);
    }
}

pub fn credentials(list: &[CredentialInfo], json: bool) {
    if json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("No stored credentials. Store one with: panel credential set NAME --username USER --password-stdin");
        return;
    }
    println!("{:<20} {:<24} {:<32} {:<24} {:<24} USED BY", "NAME", "KIND", "USERNAME", "UPDATED", "FIRST USED");
    for c in list {
        println!(
            "{:<20} {:<24} {:<32} {:<24} {:<24} {}",
            c.name,
            c.kind,
            c.username,
            format!("{} by {}", c.updated_at.format("%Y-%m-%d %H:%M"), c.updated_by),
            c.first_used_at.map_or_else(|| "never".to_string(), |t| t.format("%Y-%m-%d %H:%M").to_string()),
            if c.used_by.is_empty() { "-".to_string() } else { c.used_by.join(", ") }
        );
    }
}

pub fn audit(list: &[AuditEntry], json: bool) {
    if json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("The audit log is empty.");
        return;
    }
    for a in list {
        let detail = if a.detail.is_empty() { String::new() } else { format!("  ({})", a.detail) };
        println!("{}  {:<22} {:<20} by {}{detail}", time(&a.at), a.action, a.subject, a.actor);
    }
}

/// While `work` waits for message `id`, shows on a terminal what the message is doing, on one
/// line of stderr rewritten in place (`/ Test message 17: sending, attempt 1, 3 s of 30 s`), and
/// clears it when `work` ends. Nothing at all when stderr is not a terminal: a script, a pipe or
/// a log file gets only the outcome.
pub async fn with_progress<T>(
    panel: &panel_service::Panel,
    what: &str,
    id: i64,
    limit_secs: u64,
    work: impl std::future::Future<Output = T>,
) -> T {
    use std::io::{IsTerminal, Write};
    if !std::io::stderr().is_terminal() {
        return work.await;
    }
    let started = std::time::Instant::now();
    let ticker = async {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        for frame in ['|', '/', '-', '\\'].into_iter().cycle() {
            tick.tick().await;
            let Ok(m) = panel.message(id).await else { continue };
            let mut line = format!("{frame} {what} {id}: {}", m.state);
            if !m.attempts.is_empty() {
                line.push_str(&format!(", attempt {}", m.attempts.len() + usize::from(m.state.as_str() == "sending")));
            }
            line.push_str(&format!(", {} s of {limit_secs} s", started.elapsed().as_secs()));
            // \r and erase-line: the line is rewritten, never scrolled.
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
        }
    };
    let result = tokio::select! {
        biased;
        r = work => r,
        _ = ticker => unreachable!("the ticker never ends"),
    };
    eprint!("\r\x1b[2K");
    result
}
