//! What comes back after the relay's 250: delivery status notifications (RFC 3464), the common
//! non-standard bounces, and auto-replies, read from a message Panel received for its bounce
//! domain; and the VERP address that makes a bounce attributable to the message it is about.
//! Pure: the MIME structure is read by `mail-parser`; only the DSN fields are read by hand.

use mail_parser::{MessageParser, MimeHeaders, PartType};

/// The local part of every envelope sender Panel makes: `bounces+TOKEN@DOMAIN`.
pub const VERP_PREFIX: &str = "bounces+";

/// Most bytes of a report Panel reads (a bounce returns at most the headers, `RET=HDRS`, but a
/// non-standard one may carry the whole message back).
pub const MAX_REPORT: usize = 4 * 1024 * 1024;

/// The envelope sender for a message whose token is `token`.
pub fn verp_address(token: &str, domain: &str) -> String {
    format!("{VERP_PREFIX}{token}@{domain}")
}

/// The token of a VERP address of `domain` (`bounces+TOKEN@domain`, the domain in any case);
/// `None` for any other address.
pub fn verp_token<'a>(address: &'a str, domain: &str) -> Option<&'a str> {
    let (local, at) = address.rsplit_once('@')?;
    if !at.eq_ignore_ascii_case(domain) {
        return None;
    }
    let token = local.strip_prefix(VERP_PREFIX).or_else(|| {
        // Some MTAs lower-case or keep the case of the local part; the prefix is matched either way.
        local
            .get(..VERP_PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(VERP_PREFIX))
            .map(|_| &local[VERP_PREFIX.len()..])
    })?;
    (!token.is_empty() && token.len() <= 64 && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .then_some(token)
}

crate::string_enum!(
    /// What a received report says.
    ReportKind {
        /// Delivery failed for good (`Action: failed`, or a non-standard bounce).
        Failed = "failed",
        /// Delivery is delayed and still being tried (`Action: delayed`).
        Delayed = "delayed",
        /// An automatic reply (RFC 3834 `Auto-Submitted`, out-of-office): not a bounce.
        AutoReply = "auto_reply",
        /// Delivered or relayed (`Action: delivered|relayed|expanded`): nothing failed.
        Delivered = "delivered",
        /// Nothing Panel recognises as a report.
        Unknown = "unknown",
    }
);

/// One recipient's part of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientReport {
    /// `Final-Recipient` (or `Original-Recipient`), without its `rfc822;` type.
    pub recipient: String,
    pub kind: ReportKind,
    /// `Status` (`5.1.1`).
    pub status: Option<String>,
    /// `Diagnostic-Code` without its type (`550 5.1.1 <bob@example.net>: user unknown`).
    pub diagnostic: Option<String>,
    /// `Remote-MTA` without its type (`mx.example.net`).
    pub remote_mta: Option<String>,
}

/// A received report as Panel understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub kind: ReportKind,
    /// Per recipient, from the DSN; empty for a non-standard bounce (its text names them).
    pub recipients: Vec<RecipientReport>,
    /// `Original-Envelope-Id` (the ENVID Panel gave with MAIL FROM).
    pub envid: Option<String>,
    /// The Message-ID of the returned message (from its returned headers).
    pub original_message_id: Option<String>,
    /// `Reporting-MTA` without its type.
    pub reporting_mta: Option<String>,
    pub subject: String,
    /// For a non-standard bounce: its first line that reads like an SMTP refusal.
    pub diagnostic: Option<String>,
    /// The report's text, for matching recipients named in a non-standard bounce.
    pub text: String,
}

/// Reads a received message: a DSN (RFC 3464 `multipart/report; report-type=delivery-status`),
/// an auto-reply, or a non-standard bounce recognised by its sender and subject.
pub fn read_report(raw: &[u8]) -> Report {
    let raw = &raw[..raw.len().min(MAX_REPORT)];
    let mut report = Report {
        kind: ReportKind::Unknown,
        recipients: Vec::new(),
        envid: None,
        original_message_id: None,
        reporting_mta: None,
        subject: String::new(),
        diagnostic: None,
        text: String::new(),
    };
    let Some(message) = MessageParser::default().parse(raw) else { return report };
    report.subject = message.subject().unwrap_or_default().chars().take(300).collect();
    report.text = message.body_text(0).map(|t| t.chars().take(64 * 1024).collect()).unwrap_or_default();
    let mut status_part = None;
    for part in &message.parts {
        let Some(ct) = part.content_type() else { continue };
        let (ctype, subtype) = (ct.ctype().to_ascii_lowercase(), ct.subtype().unwrap_or_default().to_ascii_lowercase());
        match (ctype.as_str(), subtype.as_str()) {
            ("message", "delivery-status" | "global-delivery-status") => status_part = Some(part.contents()),
            ("message", "rfc822" | "global") => {
                if let PartType::Message(returned) = &part.body {
                    report.original_message_id = returned.message_id().map(|id| format!("<{id}>"));
                }
            }
            ("text", "rfc822-headers" | "global-headers") => {
                report.original_message_id = header_in(part.contents(), "message-id").map(|v| v.to_string());
            }
            _ => {}
        }
    }
    if let Some(fields) = status_part {
        read_delivery_status(fields, &mut report);
        report.kind = if report.recipients.iter().any(|r| r.kind == ReportKind::Failed) {
            ReportKind::Failed
        } else if report.recipients.iter().any(|r| r.kind == ReportKind::Delayed) {
            ReportKind::Delayed
        } else {
            ReportKind::Delivered
        };
        return report;
    }
    // RFC 3834: any Auto-Submitted other than "no" is an automatic message; out-of-office
    // replies without it say so in their subject.
    let auto_submitted = message.header_raw("Auto-Submitted").map(|v| v.trim().to_ascii_lowercase());
    let subject = report.subject.to_ascii_lowercase();
    let sender =
        message.from().and_then(|f| f.first()).and_then(|a| a.address()).unwrap_or_default().to_ascii_lowercase();
    let bounce_sender = ["mailer-daemon", "postmaster", "mail delivery"].iter().any(|s| sender.contains(s))
        || message.return_path().as_text().is_some_and(|p| p.trim_matches(['<', '>', ' ']).is_empty());
    let bounce_subject = [
        "undeliver",
        "delivery status notification (failure)",
        "delivery failure",
        "mail delivery failed",
        "failure notice",
        "returned mail",
        "delivery has failed",
        "non-delivery",
    ]
    .iter()
    .any(|s| subject.contains(s));
    if bounce_subject || (bounce_sender && auto_submitted.as_deref() != Some("auto-replied")) {
        report.kind = ReportKind::Failed;
        report.diagnostic = refusal_line(&report.text);
        if report.original_message_id.is_none() {
            report.original_message_id = header_in(report.text.as_bytes(), "message-id").map(|v| v.to_string());
        }
    } else if auto_submitted.is_some_and(|v| v != "no")
        || ["automatic reply", "out of office", "autoreply", "auto-reply", "abwesenheit"]
            .iter()
            .any(|s| subject.contains(s))
    {
        report.kind = ReportKind::AutoReply;
    }
    report
}

/// The first line of a text that reads like an SMTP refusal (`550 5.1.1 ...`, `#5.1.1`, or a
/// qmail-style `Sorry, no mailbox here by that name. (#5.1.1)`).
fn refusal_line(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|l| {
            let code = l.split_whitespace().any(|w| {
                let w = w.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '.');
                (w.len() == 3 && w.starts_with(['4', '5']) && w.bytes().all(|b| b.is_ascii_digit()))
                    || (w.len() >= 5
                        && w.starts_with(['4', '5'])
                        && w.as_bytes()[1] == b'.'
                        && w.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
            });
            code && l.len() > 6
        })
        .map(|l| l.chars().take(500).collect())
}

/// The value of header `name` in a header block (folded lines joined), first occurrence.
fn header_in<'a>(block: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(block).ok()?;
    text.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim()).filter(|v| !v.is_empty())
    })
}

/// The DSN fields (RFC 3464 2.2, 2.3): one per-message block, then one block per recipient,
/// blocks separated by blank lines, fields folded like headers. Bounded: at most 1,000
/// recipients, each value at most 1,000 characters.
fn read_delivery_status(fields: &[u8], report: &mut Report) {
    let text = String::from_utf8_lossy(fields);
    let mut blocks: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for line in text.lines() {
        if line.trim().is_empty() {
            if !blocks.last().is_some_and(Vec::is_empty) {
                blocks.push(Vec::new());
            }
            continue;
        }
        let block = blocks.last_mut().expect("one block at least");
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = block.last_mut()
                && value.len() < 1000
            {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            block.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    blocks.retain(|b| !b.is_empty());
    let get = |block: &[(String, String)], key: &str| {
        block.iter().find(|(k, _)| k == key).map(|(_, v)| v.chars().take(1000).collect::<String>())
    };
    // A typed value (`rfc822; bob@example.net`, `dns; mx.example.net`) without its type.
    let untyped = |v: String| match v.split_once(';') {
        Some((_, rest)) => rest.trim().to_string(),
        None => v,
    };
    let Some((first, rest)) = blocks.split_first() else { return };
    report.envid = get(first, "original-envelope-id").map(|v| xtext_decode(&v));
    report.reporting_mta = get(first, "reporting-mta").map(untyped);
    for block in rest.iter().take(1000) {
        let Some(recipient) = get(block, "final-recipient").or_else(|| get(block, "original-recipient")) else {
            continue;
        };
        let kind = match get(block, "action").unwrap_or_default().to_ascii_lowercase().as_str() {
            "failed" => ReportKind::Failed,
            "delayed" => ReportKind::Delayed,
            "delivered" | "relayed" | "expanded" => ReportKind::Delivered,
            _ => ReportKind::Unknown,
        };
        report.recipients.push(RecipientReport {
            recipient: untyped(recipient).trim_matches(['<', '>']).to_ascii_lowercase(),
            kind,
            status: get(block, "status"),
            diagnostic: get(block, "diagnostic-code").map(untyped),
            remote_mta: get(block, "remote-mta").map(untyped),
        });
    }
}

/// RFC 3461 4: xtext, `+XX` for a byte outside `!`..`~`, `+` or `=`.
pub fn xtext_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'!'..=b'~' if b != b'+' && b != b'=' => (b as char).to_string(),
            _ => format!("+{b:02X}"),
        })
        .collect()
}

fn xtext_decode(value: &str) -> String {
    hex_unescape(value, b'+')
}

/// Undoes `MARKER` + two hex digits (xtext's `+2B`, a URL's `%40`); anything else stays.
pub fn hex_unescape(value: &str, marker: u8) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == marker
            && let Some(b) = value.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mailbox bounces land in, as `[bounces] imap_url` names it:
/// `imaps://USER@HOST[:PORT][/FOLDER]` (TLS, port 993) or `imap://...` (STARTTLS required, port
/// 143); the folder defaults to INBOX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImapUrl {
    pub implicit_tls: bool,
    pub username: String,
    pub host: String,
    pub port: u16,
    pub folder: String,
}

impl ImapUrl {
    pub fn parse(url: &str) -> Result<ImapUrl, String> {
        let bad =
            |why: &str| format!("'{url}' {why}; write imaps://USER@HOST[:PORT][/FOLDER] (or imap:// for STARTTLS)");
        let (implicit_tls, rest) = match url.split_once("://") {
            Some((s, rest)) if s.eq_ignore_ascii_case("imaps") => (true, rest),
            Some((s, rest)) if s.eq_ignore_ascii_case("imap") => (false, rest),
            _ => return Err(bad("is not an imaps:// or imap:// URL")),
        };
        let (authority, folder) = rest.split_once('/').unwrap_or((rest, ""));
        let Some((user, hostport)) = authority.rsplit_once('@') else { return Err(bad("names no user")) };
        let user = hex_unescape(user, b'%');
        if user.is_empty() || user.chars().any(|c| c.is_control() || c == '"') {
            return Err(bad("has an empty or unusable user"));
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => {
                (h, p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| bad("has a bad port"))?)
            }
            _ => (hostport, if implicit_tls { 993 } else { 143 }),
        };
        let host =
            crate::settings::validate_host("imap_url", host.trim_matches(['[', ']'])).map_err(|e| bad(&e.message))?;
        let folder = if folder.is_empty() { "INBOX".to_string() } else { folder.to_string() };
        if folder.chars().any(|c| c.is_control()) {
            return Err(bad("has a control character in its folder"));
        }
        Ok(ImapUrl { implicit_tls, username: user, host, port, folder })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bounce as Postfix 3.7 writes it (shortened), for a recipient the next hop refused.
    pub(crate) const POSTFIX_BOUNCE: &str = "From: MAILER-DAEMON@lab.panel.test (Mail Delivery System)\r
Subject: Undelivered Mail Returned to Sender\r
To: bounces+42-abc@bounces.example.org\r
Auto-Submitted: auto-replied\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B1\"\r
\r
--B1\r
Content-Type: text/plain; charset=us-ascii\r
\r
I'm sorry to have to inform you that your message could not be delivered.\r
\r
<bob@example.net>: host 127.0.0.1[127.0.0.1] said: 550 5.1.1 Mailbox unavailable (in reply to RCPT TO command)\r
\r
--B1\r
Content-Type: message/delivery-status\r
\r
Reporting-MTA: dns; lab.panel.test\r
Original-Envelope-Id: +3Cabc+40example.org+3E\r
Arrival-Date: Sun,  6 Dec 2026 08:00:00 +0000 (UTC)\r
\r
Final-Recipient: rfc822; bob@example.net\r
Original-Recipient: rfc822;bob@example.net\r
Action: failed\r
Status: 5.1.1\r
Remote-MTA: dns; 127.0.0.1\r
Diagnostic-Code: smtp; 550 5.1.1 Mailbox\r
    unavailable\r
\r
--B1\r
Content-Type: text/rfc822-headers\r
\r
From: Panel <panel@example.org>\r
Message-ID: <abc@example.org>\r
Subject: Reset your password\r
\r
--B1--\r
";

    #[test]
    fn a_postfix_dsn_gives_each_recipients_action_status_reply_and_remote_server() {
        let r = read_report(POSTFIX_BOUNCE.as_bytes());
        assert_eq!(r.kind, ReportKind::Failed, "a DSN is a bounce though it is auto-submitted");
        assert_eq!(r.envid.as_deref(), Some("<abc@example.org>"));
        assert_eq!(r.original_message_id.as_deref(), Some("<abc@example.org>"));
        assert_eq!(r.reporting_mta.as_deref(), Some("lab.panel.test"));
        assert_eq!(
            r.recipients,
            [RecipientReport {
                recipient: "bob@example.net".into(),
                kind: ReportKind::Failed,
                status: Some("5.1.1".into()),
                diagnostic: Some("550 5.1.1 Mailbox unavailable".into()),
                remote_mta: Some("127.0.0.1".into()),
            }]
        );
    }

    #[test]
    fn a_delayed_dsn_is_delayed_and_a_later_failed_one_failed() {
        let delayed =
            POSTFIX_BOUNCE.replace("Action: failed", "Action: delayed").replace("Status: 5.1.1", "Status: 4.4.1");
        let r = read_report(delayed.as_bytes());
        assert_eq!((r.kind, r.recipients[0].kind), (ReportKind::Delayed, ReportKind::Delayed));
        assert_eq!(r.recipients[0].status.as_deref(), Some("4.4.1"));
        let delivered = POSTFIX_BOUNCE.replace("Action: failed", "Action: relayed");
        assert_eq!(read_report(delivered.as_bytes()).kind, ReportKind::Delivered);
    }

    #[test]
    fn non_standard_bounces_and_auto_replies_are_told_apart() {
        let qmail = "From: MAILER-DAEMON@mx.example.net\r\nSubject: failure notice\r\n\r\nHi. This is the qmail-send program.\r\n<bob@example.net>:\r\nSorry, no mailbox here by that name. (#5.1.1)\r\n\r\n--- Below this line is a copy of the message.\r\nMessage-ID: <abc@example.org>\r\n";
        let r = read_report(qmail.as_bytes());
        assert_eq!(r.kind, ReportKind::Failed);
        assert!(r.diagnostic.as_deref().unwrap().contains("#5.1.1"), "{r:?}");
        assert_eq!(r.original_message_id.as_deref(), Some("<abc@example.org>"));
        assert!(r.text.contains("bob@example.net"));

        let exchange = "From: postmaster@contoso.com\r\nSubject: Undeliverable: Reset your password\r\nContent-Type: text/plain\r\n\r\nDelivery has failed to these recipients or groups:\r\nbob@contoso.com\r\nRemote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup'\r\n";
        let r = read_report(exchange.as_bytes());
        assert_eq!(r.kind, ReportKind::Failed);
        assert!(r.diagnostic.as_deref().unwrap().contains("550 5.1.10"), "{r:?}");

        let away = "From: Bob <bob@example.net>\r\nSubject: Automatic reply: Reset your password\r\nAuto-Submitted: auto-replied\r\n\r\nI am away until Monday.\r\n";
        assert_eq!(read_report(away.as_bytes()).kind, ReportKind::AutoReply);
        let plain = "From: Bob <bob@example.net>\r\nSubject: Re: Reset your password\r\n\r\nThanks!\r\n";
        assert_eq!(read_report(plain.as_bytes()).kind, ReportKind::Unknown);
    }

    #[test]
    fn a_verp_address_carries_its_token_only_for_the_bounce_domain() {
        let a = verp_address("42-0a1b", "bounces.example.org");
        assert_eq!(a, "bounces+42-0a1b@bounces.example.org");
        assert_eq!(verp_token(&a, "Bounces.Example.org"), Some("42-0a1b"));
        assert_eq!(verp_token(&a, "example.org"), None);
        assert_eq!(verp_token("bounces+@bounces.example.org", "bounces.example.org"), None);
        assert_eq!(verp_token("bounces+a b@bounces.example.org", "bounces.example.org"), None);
        assert_eq!(verp_token("postmaster@bounces.example.org", "bounces.example.org"), None);
        assert_eq!(xtext_encode("<a+b=c@x>"), "<a+2Bb+3Dc@x>");
        assert_eq!(xtext_decode("<a+2Bb+3Dc@x>"), "<a+b=c@x>");
    }

    #[test]
    fn an_imap_url_names_the_mailbox_with_secure_defaults() {
        let u = ImapUrl::parse("imaps://bounces%40example.org@mail.example.org/Bounces").unwrap();
        assert_eq!(
            u,
            ImapUrl {
                implicit_tls: true,
                username: "bounces@example.org".into(),
                host: "mail.example.org".into(),
                port: 993,
                folder: "Bounces".into()
            }
        );
        let u = ImapUrl::parse("imap://panel@127.0.0.1:1143").unwrap();
        assert_eq!((u.implicit_tls, u.port, u.folder.as_str()), (false, 1143, "INBOX"));
        for bad in ["http://x@y", "imaps://host.example", "imaps://u@host:0", "imaps://u@bad host"] {
            assert!(ImapUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
