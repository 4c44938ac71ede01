//! A message as queued: validated content and envelope, rendered to RFC 5322 bytes at send time
//! with the Date and Message-ID fixed at enqueue, so every attempt sends the same message.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use lettre::message::{Attachment as MimeAttachment, MultiPart, SinglePart, header::ContentType};
use serde::{Deserialize, Serialize};

use crate::address::{EmailAddress, Mailbox};
use crate::errors::{FieldErrors, check_header_safe};

use crate::string_enum;

string_enum!(
    /// Where a message is in its life. `Queued` and `Retrying` wait for a worker; `Sending` is
    /// held under a worker's lease; `Delivered`, `PartlyFailed` and `Failed` are final, and
    /// follow the recipients: all delivered, some delivered and the others refused for good, or
    /// none delivered. A partly failed or failed message can be retried by hand (to the refused
    /// recipients only). `Cancelled` is final by an operator's decision (who and why are in its
    /// last error and the audit log): nothing sends it again.
    MessageState {
        Queued = "queued",
        Sending = "sending",
        Retrying = "retrying",
        Delivered = "delivered",
        PartlyFailed = "partly_failed",
        Failed = "failed",
        Cancelled = "cancelled",
        /// Kept, not sent: the recipient policy's capture mode (a test installation's mail
        /// catcher). Final; the message can be read and downloaded as .eml.
        Captured = "captured",
        /// The relay accepted it, and every recipient's server then refused it (a bounce came
        /// back for each). Final. (Some bounced, others delivered: partly failed.)
        Bounced = "bounced",
    }
);

impl MessageState {
    /// Final and not delivered to every recipient: what "Retry all failed" takes.
    pub fn is_refused(self) -> bool {
        matches!(self, MessageState::Failed | MessageState::PartlyFailed)
    }

    /// No worker will touch it again by itself.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MessageState::Delivered
                | MessageState::PartlyFailed
                | MessageState::Failed
                | MessageState::Cancelled
                | MessageState::Captured
                | MessageState::Bounced
        )
    }

    /// What an operator may cancel: anything not delivered to everyone and not in a worker's
    /// hands right now (a message being sent is cancelled after its attempt, or not at all).
    pub fn is_cancellable(self) -> bool {
        matches!(
            self,
            MessageState::Queued | MessageState::Retrying | MessageState::Failed | MessageState::PartlyFailed
        )
    }
}

string_enum!(
    /// What created the message.
    Origin {
        TestMessage = "test_message",
        MailTester = "mail_tester",
        Schedule = "schedule",
        Workflow = "workflow",
        Dispatch = "dispatch",
    }
);

string_enum!(
    /// Which mail goes first: urgent mail (a password reset, the Test Message) is claimed before
    /// bulk mail (a schedule's reminders), which still gets a share of every worker.
    Priority {
        Urgent = "urgent",
        Bulk = "bulk",
    }
);

impl Priority {
    /// By where a message comes from, unless its caller says: schedules, dispatches and the bulk
    /// API are bulk; the Test Message, the mail tester (API and CLI sends) and events are urgent.
    pub fn default_for(origin: Origin) -> Priority {
        match origin {
            Origin::Schedule | Origin::Dispatch => Priority::Bulk,
            Origin::TestMessage | Origin::MailTester | Origin::Workflow => Priority::Urgent,
        }
    }

    /// The order of claiming: lower first.
    pub fn rank(self) -> i64 {
        match self {
            Priority::Urgent => 0,
            Priority::Bulk => 1,
        }
    }
}

string_enum!(RecipientKind { To = "to", Cc = "cc", Bcc = "bcc" });

string_enum!(
    /// Per-recipient outcome: a message to three recipients can reach two and fail one. After
    /// the relay's 250 a report can still come back: `bounced` (the recipient's server refused
    /// it for good) or `delayed` (still being tried, past the relay).
    RecipientState {
        Pending = "pending",
        Delivered = "delivered",
        Failed = "failed",
        Captured = "captured",
        Bounced = "bounced",
        Delayed = "delayed",
    }
);

/// What a caller asks to send, before validation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Draft {
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub cc: Vec<String>,
    #[serde(default)]
    pub bcc: Vec<String>,
    #[serde(default)]
    pub reply_to: Option<String>,
    pub subject: String,
    pub text: String,
    #[serde(default)]
    pub html: Option<String>,
    /// Overrides the settings' From address (steps may do so only where the settings allow it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    /// `urgent` or `bulk`; unset: by origin (`Priority::default_for`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// A text attachment (a CSV report, say), produced by a step from its context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    pub content: String,
}

/// True for a MIME type such as `text/csv` or `text/plain; charset=utf-8`.
pub fn is_valid_content_type(value: &str) -> bool {
    value.parse::<ContentType>().is_ok() && !value.contains(['\r', '\n'])
}

/// A validated message, ready to be stored and sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingMessage {
    pub from: Mailbox,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    pub reply_to: Option<Mailbox>,
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
    pub message_id: String,
    pub date: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    /// True when the draft named no recipient and the Fallback recipient was used.
    pub used_fallback_recipient: bool,
    /// As the draft asked; unset: by origin, decided when it is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Set when the recipient policy redirected it: whom it was for (`To: a; Cc: b`), sent as
    /// `X-Panel-Original-Recipients`. Never stored: the worker sets it on the copy it sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_recipients: Option<String>,
}

/// Largest body accepted into the queue; relays commonly refuse much less.
pub const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;

impl Draft {
    /// What counts against `MAX_BODY_BYTES`: the text, the HTML and the attachments' content.
    pub fn content_bytes(&self) -> usize {
        let attached: usize = self.attachments.iter().map(|a| a.content.len()).sum();
        self.text.len() + self.html.as_ref().map_or(0, String::len) + attached
    }
}

/// A Message-ID that sorts by when it was made: the time in milliseconds (fixed-width hex, so
/// that text order is time order until the year 2527), then 128 random bits that make it
/// unique. Each message's Message-ID is a key of the database's index that finds a bounce's
/// message; led by random bits, every insert wrote a leaf page of that index of its own, a page
/// anywhere in it (on SQLite about a quarter of what a message wrote to the disk); led by the
/// time, a commit's messages go to the index's last page together, as a growing index wants.
fn message_id(now: DateTime<Utc>, unique: u128, domain: &str) -> String {
    format!("<{:011x}.{unique:032x}@{domain}>", now.timestamp_millis().max(0))
}

impl OutgoingMessage {
    /// Validates `draft`, reporting every bad field at once. `unique` makes the Message-ID unique
    /// (random bits from the caller keep this crate free of I/O).
    pub fn prepare(
        draft: &Draft,
        from: &Mailbox,
        fallback: &EmailAddress,
        now: DateTime<Utc>,
        unique: u128,
    ) -> Result<OutgoingMessage, FieldErrors> {
        let mut errors = FieldErrors::default();
        let mut list = |field: &str, values: &[String]| -> Vec<Mailbox> {
            values
                .iter()
                .enumerate()
                .filter_map(|(i, v)| errors.take(Mailbox::parse(&format!("{field}[{i}]"), v)))
                .collect()
        };
        let mut to = list("to", &draft.to);
        let cc = list("cc", &draft.cc);
        let bcc = list("bcc", &draft.bcc);
        let reply_to = draft.reply_to.as_deref().and_then(|v| errors.take(Mailbox::parse("reply_to", v)));
        let from = match draft.from.as_deref() {
            Some(v) => errors.take(Mailbox::parse("from", v)).unwrap_or_else(|| from.clone()),
            None => from.clone(),
        };
        for (i, a) in draft.attachments.iter().enumerate() {
            errors.take(check_header_safe(&format!("attachments[{i}].filename"), &a.filename));
            if a.filename.trim().is_empty() {
                errors.push(format!("attachments[{i}].filename"), "is empty");
            }
            if !is_valid_content_type(&a.content_type) {
                errors.push(format!("attachments[{i}].content_type"), "is not a valid MIME type (e.g. text/csv)");
            }
        }
        errors.take(check_header_safe("subject", &draft.subject));
        if draft.subject.len() > 998 {
            errors.push("subject", "is longer than 998 characters; shorten it");
        }
        if draft.content_bytes() > MAX_BODY_BYTES {
            errors.push("text", format!("the body is larger than {} MiB", MAX_BODY_BYTES >> 20));
        }
        if draft.text.contains('\0') || draft.html.as_deref().is_some_and(|h| h.contains('\0')) {
            errors.push("text", "contains a NUL character, which SMTP cannot carry");
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let no_recipient = draft.to.is_empty() && draft.cc.is_empty() && draft.bcc.is_empty();
        if no_recipient {
            to.push(fallback.clone().into());
        }
        let message_id = message_id(now, unique, from.address.domain());
        Ok(OutgoingMessage {
            from,
            to,
            cc,
            bcc,
            reply_to,
            subject: draft.subject.clone(),
            text: draft.text.clone(),
            html: draft.html.clone(),
            message_id,
            date: now,
            attachments: draft.attachments.clone(),
            used_fallback_recipient: no_recipient,
            priority: draft.priority,
            original_recipients: None,
        })
    }

    /// Every envelope recipient once, in To, Cc, Bcc order.
    /// Whether `other` carries the same message: everything but what Panel gives each enqueue
    /// (its Message-ID and Date). A repeated idempotency key must bring the same content.
    pub fn same_content(&self, other: &OutgoingMessage) -> bool {
        let comparable = |m: &OutgoingMessage| OutgoingMessage {
            message_id: String::new(),
            date: DateTime::<Utc>::UNIX_EPOCH,
            ..m.clone()
        };
        comparable(self) == comparable(other)
    }

    pub fn recipients(&self) -> Vec<(RecipientKind, &EmailAddress)> {
        let mut seen = std::collections::HashSet::new();
        let kinds = [(RecipientKind::To, &self.to), (RecipientKind::Cc, &self.cc), (RecipientKind::Bcc, &self.bcc)];
        kinds
            .into_iter()
            .flat_map(|(kind, list)| list.iter().map(move |m| (kind, &m.address)))
            .filter(|(_, a)| seen.insert(a.as_str().to_ascii_lowercase()))
            .collect()
    }

    /// The message as it goes after DATA (before dot-stuffing). Bcc recipients are in the
    /// envelope only, never in the headers.
    pub fn render(&self) -> Vec<u8> {
        self.render_with(false)
    }

    /// The message for Microsoft Graph, which has no envelope: it takes every recipient from
    /// the headers, Bcc included, and removes the Bcc header from what recipients get.
    pub fn render_for_graph(&self) -> Vec<u8> {
        self.render_with(true)
    }

    fn render_with(&self, bcc_header: bool) -> Vec<u8> {
        let mut builder = lettre::Message::builder()
            .raw_header(address_list("From", std::slice::from_ref(&self.from)))
            .message_id(Some(self.message_id.clone()))
            .date(SystemTime::UNIX_EPOCH + Duration::from_secs(self.date.timestamp().max(0) as u64))
            .user_agent(format!("Panel/{}", env!("CARGO_PKG_VERSION")));
        if !self.to.is_empty() {
            builder = builder.raw_header(address_list("To", &self.to));
        }
        if !self.cc.is_empty() {
            builder = builder.raw_header(address_list("Cc", &self.cc));
        }
        if bcc_header && !self.bcc.is_empty() {
            // lettre drops a Bcc header when it formats the message, unless told to keep it.
            builder = builder.raw_header(address_list("Bcc", &self.bcc)).keep_bcc();
        }
        if let Some(r) = &self.reply_to {
            builder = builder.raw_header(address_list("Reply-To", std::slice::from_ref(r)));
        }
        if let Some(original) = &self.original_recipients {
            // Addresses only (validated, ASCII or SMTPUTF8-checked), folded as any header.
            use lettre::message::header::{HeaderName, HeaderValue};
            let name = HeaderName::new_from_ascii_str("X-Panel-Original-Recipients");
            let words: Vec<String> = original.split(' ').map(String::from).collect();
            let folded = crate::header::fold("X-Panel-Original-Recipients", &words);
            builder = builder.raw_header(HeaderValue::dangerous_new_pre_encoded(name, original.clone(), folded));
        }
        // Plain ASCII subjects go as lettre writes them; others (and text that looks like an
        // encoded word) as encoded words, so that readers show exactly the text given.
        builder = match crate::header::unstructured(&self.subject) {
            None => builder.subject(self.subject.clone()),
            Some(words) => {
                use lettre::message::header::{HeaderName, HeaderValue};
                let encoded = crate::header::fold("Subject", &words);
                let name = HeaderName::new_from_ascii_str("Subject");
                builder.raw_header(HeaderValue::dangerous_new_pre_encoded(name, self.subject.clone(), encoded))
            }
        };
        let envelope_to: Vec<lettre::Address> = self.recipients().iter().map(|(_, a)| a.as_lettre().clone()).collect();
        let envelope = lettre::address::Envelope::new(Some(self.from.address.as_lettre().clone()), envelope_to)
            .expect("a prepared message has at least one recipient");
        builder = builder.envelope(envelope);
        let text = SinglePart::builder().header(ContentType::TEXT_PLAIN).body(self.text.clone());
        let message = match (&self.html, self.attachments.is_empty()) {
            (None, true) => builder.singlepart(text),
            (Some(html), true) => builder.multipart(alternative(text, html)),
            (html, false) => {
                let body = match html {
                    None => MultiPart::mixed().singlepart(text),
                    Some(html) => MultiPart::mixed().multipart(alternative(text, html)),
                };
                let parts = self.attachments.iter().fold(body, |parts, a| {
                    let content_type = with_charset(&a.content_type).parse().unwrap_or(ContentType::TEXT_PLAIN);
                    parts.singlepart(MimeAttachment::new(a.filename.clone()).body(a.content.clone(), content_type))
                });
                builder.multipart(parts)
            }
        };
        message.expect("a prepared message always builds").formatted()
    }
}

/// An address header (From, To, Cc, Reply-To) written by Panel, not lettre: each display name
/// is an RFC 5322 phrase (`header::phrase`: atoms, a quoted-string, or encoded words outside
/// quotes), and lines break between words and addresses, never inside a quoted name or an
/// encoded word. lettre is given the bare addresses to parse (its From check); the wire gets
/// the encoded text.
fn address_list(name: &'static str, list: &[Mailbox]) -> lettre::message::header::HeaderValue {
    use lettre::message::header::{HeaderName, HeaderValue};
    // A mailbox that fits on a line is one unit (never broken inside its name); a longer one
    // breaks between its words.
    let mut words = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let mut mailbox = m.name.as_deref().map(crate::header::phrase).unwrap_or_default();
        let comma = if i + 1 == list.len() { "" } else { "," };
        mailbox.push(match m.name {
            Some(_) => format!("<{}>{comma}", m.address),
            None => format!("{}{comma}", m.address),
        });
        let whole = mailbox.join(" ");
        if whole.len() <= 76 {
            words.push(whole);
        } else {
            words.extend(mailbox);
        }
    }
    let encoded = crate::header::fold(name, &words);
    let raw = list.iter().map(|m| m.address.to_string()).collect::<Vec<_>>().join(", ");
    HeaderValue::dangerous_new_pre_encoded(HeaderName::new_from_ascii_str(name), raw, encoded)
}

/// An attachment's content is text Panel rendered (UTF-8): a `text/*` type without a charset
/// gets `charset=utf-8`, or readers guess (and show `??` for every non-ASCII letter).
fn with_charset(content_type: &str) -> String {
    let t = content_type.trim();
    let is_text = t.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("text/"));
    if is_text && !t.to_ascii_lowercase().contains("charset=") { format!("{t}; charset=utf-8") } else { t.to_string() }
}

fn alternative(text: SinglePart, html: &str) -> MultiPart {
    MultiPart::alternative()
        .singlepart(text)
        .singlepart(SinglePart::builder().header(ContentType::TEXT_HTML).body(html.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from() -> Mailbox {
        Mailbox::parse("from", "Identity Panel <panel@example.org>").unwrap()
    }

    fn fallback() -> EmailAddress {
        EmailAddress::parse("fallback_recipient", "ops@example.org").unwrap()
    }

    fn draft() -> Draft {
        Draft {
            to: vec!["Jörg Müller <joerg@example.org>".into()],
            subject: "Passwort läuft ab".into(),
            text: "Hello\n.hidden line\nbye".into(),
            ..Default::default()
        }
    }

    fn prepare(d: &Draft) -> Result<OutgoingMessage, FieldErrors> {
        OutgoingMessage::prepare(d, &from(), &fallback(), Utc::now(), 42)
    }

    #[test]
    fn no_recipient_goes_to_the_fallback_and_says_so() {
        let m = prepare(&Draft { to: vec![], ..draft() }).unwrap();
        assert!(m.used_fallback_recipient);
        assert_eq!(m.recipients()[0].1.as_str(), "ops@example.org");
        assert!(!prepare(&draft()).unwrap().used_fallback_recipient);
    }

    #[test]
    fn header_injection_is_rejected_naming_each_field() {
        let d = Draft {
            to: vec!["ok@example.org".into(), "x@example.org\r\nBcc: victim@evil.example".into()],
            cc: vec!["bad".into()],
            subject: "Hi\r\nBcc: victim@evil.example".into(),
            ..draft()
        };
        let fields: Vec<_> = prepare(&d).unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["to[1]", "cc[0]", "subject"]);
    }

    #[test]
    fn message_ids_sort_by_the_time_they_were_made_whatever_their_random_part() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-12-07T10:00:00Z").unwrap().with_timezone(&Utc);
        let earlier = message_id(t, u128::MAX, "example.org");
        let later = message_id(t + chrono::Duration::milliseconds(1), 0, "example.org");
        assert!(earlier < later, "{earlier} sorts after {later}");
        // Fixed width: an instant whose hex has fewer digits still sorts before.
        let epoch = message_id(DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::milliseconds(15), u128::MAX, "x.org");
        assert!(epoch < earlier, "{epoch} sorts after {earlier}");
        assert_eq!(later, format!("<{:011x}.{:032x}@example.org>", t.timestamp_millis() + 1, 0));
        assert_ne!(message_id(t, 1, "example.org"), message_id(t, 2, "example.org"), "the random part makes it unique");
    }

    #[test]
    fn renders_encoded_utf8_headers_and_fixed_ids() {
        let m = prepare(&draft()).unwrap();
        let raw = String::from_utf8(m.render()).unwrap();
        assert!(raw.contains(&format!("Message-ID: {}", m.message_id)), "{raw}");
        assert!(m.message_id.ends_with("@example.org>"));
        assert!(raw.contains("Subject: =?utf-8?b?"), "subject must use an encoded word: {raw}");
        assert!(raw.contains("From: Identity Panel <panel@example.org>"), "{raw}");
        assert!(raw.contains("<joerg@example.org>"));
        assert!(raw.contains("Date: "));
        assert!(!raw.contains("Jörg"), "non-ASCII in headers must be encoded");
        assert_eq!(m.render(), m.render(), "every attempt sends the same bytes");
    }

    #[test]
    fn graph_gets_the_bcc_in_the_headers_and_otherwise_the_same_message() {
        let d = Draft { bcc: vec!["hidden@example.org".into()], ..draft() };
        let m = prepare(&d).unwrap();
        let smtp = String::from_utf8(m.render()).unwrap();
        let graph = String::from_utf8(m.render_for_graph()).unwrap();
        assert!(graph.contains("Bcc: hidden@example.org\r\n") && !smtp.contains("hidden@"), "{graph}");
        assert_eq!(graph.replace("Bcc: hidden@example.org\r\n", ""), smtp, "nothing else differs");
    }

    #[test]
    fn bcc_is_in_the_envelope_but_not_the_headers() {
        let d = Draft { bcc: vec!["hidden@example.org".into()], ..draft() };
        let m = prepare(&d).unwrap();
        let raw = String::from_utf8(m.render()).unwrap();
        assert!(!raw.to_ascii_lowercase().contains("hidden@example.org"));
        assert!(m.recipients().iter().any(|(k, a)| *k == RecipientKind::Bcc && a.as_str() == "hidden@example.org"));
    }

    #[test]
    fn duplicate_recipients_are_sent_once() {
        let d = Draft { cc: vec!["JOERG@example.org".into()], ..draft() };
        assert_eq!(prepare(&d).unwrap().recipients().len(), 1);
    }

    #[test]
    fn html_alternative_is_multipart() {
        let d = Draft { html: Some("<p>Hi</p>".into()), ..draft() };
        let raw = String::from_utf8(prepare(&d).unwrap().render()).unwrap();
        assert!(raw.contains("multipart/alternative"));
        assert!(raw.contains("text/html"));
        assert!(raw.contains("text/plain"));
    }

    #[test]
    fn attachments_and_a_from_override_are_carried() {
        let d = Draft {
            from: Some("Reports <reports@example.org>".into()),
            html: Some("<p>see</p>".into()),
            attachments: vec![Attachment {
                filename: "users.csv".into(),
                content_type: "text/csv".into(),
                content: "name\nann\n".into(),
            }],
            ..draft()
        };
        let m = prepare(&d).unwrap();
        assert_eq!(m.from.address.as_str(), "reports@example.org");
        let raw = String::from_utf8(m.render()).unwrap();
        assert!(raw.contains("multipart/mixed"), "{raw}");
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("filename=\"users.csv\""), "{raw}");
        let bad = Draft {
            attachments: vec![Attachment {
                filename: "a\r\nb".into(),
                content_type: "nope".into(),
                content: "".into(),
            }],
            ..draft()
        };
        let fields: Vec<_> = prepare(&bad).unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["attachments[0].filename", "attachments[0].content_type"]);
    }

    #[test]
    fn states_round_trip() {
        for s in MessageState::ALL {
            assert_eq!(MessageState::parse(s).unwrap().as_str(), *s);
        }
        assert_eq!(Origin::parse("test_message"), Some(Origin::TestMessage));
        assert_eq!(Origin::parse("nope"), None);
    }

    #[test]
    fn a_long_to_header_folds_between_addresses_never_inside_a_name() {
        let to: Vec<String> =
            (0..6).map(|i| format!("Directory Person Number {i} Of Finance <person{i}@example.org>")).collect();
        let draft = Draft { to, cc: vec!["Ops Team <ops@example.org>".into()], ..draft() };
        let m = OutgoingMessage::prepare(&draft, &from(), &fallback(), Utc::now(), 1).unwrap();
        let text = String::from_utf8(m.render()).unwrap();
        let header: Vec<&str> = text
            .split("\r\n")
            .skip_while(|l| !l.starts_with("To: "))
            .take_while(|l| l.starts_with("To: ") || l.starts_with(' '))
            .collect();
        assert!(header.len() > 1, "six long names need several lines: {header:?}");
        for line in &header {
            assert!(line.len() <= 78, "{line:?}");
            assert_eq!(line.matches('"').count() % 2, 0, "a line breaks inside a quoted name: {line:?}");
            assert!(line.trim_end().ends_with('>') || line.trim_end().ends_with(">,"), "{line:?}");
        }
        let unfolded = header.join("");
        for i in 0..6 {
            assert!(unfolded.contains(&format!("Directory Person Number {i} Of Finance <person{i}@example.org>")));
        }
        assert!(
            text.contains("\r\nCc: \"Ops Team\" <ops@example.org>\r\n")
                || text.contains("\r\nCc: Ops Team <ops@example.org>\r\n"),
            "{text}"
        );
    }

    /// What a reader shows: the rendered message parsed back by a mail parser.
    fn read_back(m: &OutgoingMessage) -> mail_parser::Message<'static> {
        mail_parser::MessageParser::default().parse(&m.render()).expect("parses").into_owned()
    }

    #[test]
    fn display_names_and_subjects_read_back_exactly_as_given() {
        let names = [
            r#"Doe, John (Ops) "JD""#,
            r"Back\slash Person",
            "Jörg Müller",
            "O'Brien, Siobhán",
            "ops@example.org",
            "=?utf-8?q?not_an_encoded_word?=",
            "Dr. Ana María Pérez-González de la Fuente, Head of Identity (EMEA)",
            "李小龍",
        ];
        for name in names {
            let to = format!("\"{}\" <x@example.org>", name.replace('\\', "\\\\").replace('"', "\\\""));
            let subject = format!("Re: {name}");
            let d = Draft { to: vec![to], subject: subject.clone(), ..draft() };
            let m = prepare(&d).unwrap();
            assert_eq!(m.to[0].name.as_deref(), Some(name), "parsed as typed");
            let raw = String::from_utf8(m.render()).unwrap();
            for line in raw.split("\r\n").take_while(|l| !l.is_empty()) {
                assert!(line.len() <= 78 && line.is_ascii(), "{line:?}");
            }
            let read = read_back(&m);
            let shown = read.to().and_then(|a| a.first()).and_then(|a| a.name.as_deref()).map(String::from);
            assert_eq!(shown.as_deref(), Some(name), "{raw}");
            assert_eq!(read.subject(), Some(subject.as_str()), "{raw}");
        }
    }

    #[test]
    fn an_encoded_word_typed_as_text_is_not_decoded_into_a_line_break() {
        let subject = "=?utf-8?q?Reset=0D=0ABcc:_victim@example.org?=";
        let m = prepare(&Draft { subject: subject.into(), ..draft() }).unwrap();
        let read = read_back(&m);
        assert_eq!(read.subject(), Some(subject), "shown as typed, not decoded");
        for bad in ["a\u{b}b", "a\u{c}b", "a\u{1b}[31mb"] {
            let e = prepare(&Draft { subject: bad.into(), ..draft() }).unwrap_err();
            assert!(e.0[0].message.contains("control character"), "{e:?}");
        }
    }

    #[test]
    fn a_non_ascii_text_attachment_says_its_charset() {
        let attachments = vec![Attachment {
            filename: "users.csv".into(),
            content_type: "text/csv".into(),
            content: "name\nJörg Müller\n".into(),
        }];
        let m = prepare(&Draft { attachments, ..draft() }).unwrap();
        let read = read_back(&m);
        let part = read.attachment(0).expect("the attachment");
        use mail_parser::MimeHeaders;
        let ct = part.content_type().unwrap();
        assert_eq!((ct.ctype(), ct.subtype()), ("text", Some("csv")));
        assert_eq!(ct.attribute("charset").map(|c| c.to_ascii_lowercase()).as_deref(), Some("utf-8"));
        // Text travels with CRLF line ends; the letters arrive as written.
        assert_eq!(part.text_contents().map(|t| t.replace("\r\n", "\n")).as_deref(), Some("name\nJörg Müller\n"));
        assert_eq!(with_charset("text/plain; charset=iso-8859-1"), "text/plain; charset=iso-8859-1");
        assert_eq!(with_charset("application/pdf"), "application/pdf");
    }
}
