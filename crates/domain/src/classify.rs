//! What a relay's answer (or silence) means: delivered, try again later, give up, or fix the
//! configuration. Each verdict carries a hint an admin can act on.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::security::Security;

crate::string_enum!(custom_display;
    /// Where in the SMTP conversation something happened (shown in capitals: `AUTH`, `RCPT`).
    Stage {
        /// Before any network I/O: settings, password source, CA file.
        Config = "config",
        Dns = "dns",
        Tcp = "tcp",
        Tls = "tls",
        Greeting = "greeting",
        Ehlo = "ehlo",
        Starttls = "starttls",
        /// Obtaining an OAuth2 access token from the provider (before AUTH XOAUTH2, or Graph).
        Token = "token",
        /// Microsoft Graph's sendMail call (`transport = graph`): the reply is its HTTP status.
        Graph = "graph",
        Auth = "auth",
        Mail = "mail",
        Rcpt = "rcpt",
        Data = "data",
        Quit = "quit",
        /// Inside Panel, not at the relay: the delivery code failed (a bug), see the detail.
        Internal = "internal",
        /// Panel's recipient policy refused the recipient; nothing was sent to it.
        Policy = "policy",
        /// Not known: the worker holding the message stopped before recording where it was.
        Unknown = "unknown",
    }
);

impl Stage {
    /// Reaching the relay: a failure here is the relay's (down, refusing service), never the
    /// message's, and the relay-wide backoff counts it.
    pub const REACHING: [Stage; 6] =
        [Stage::Dns, Stage::Tcp, Stage::Tls, Stage::Greeting, Stage::Ehlo, Stage::Starttls];

    /// Everything every message on the relay goes through before its own MAIL FROM: settings,
    /// connection, TLS, token and AUTH. A failure here stops all mail alike, so a later attempt
    /// that got past them (whatever the relay then said) proves them fixed for everyone.
    /// Graph's refusals (its 401 and 403) are of the app and mailbox, not of one message.
    pub const SESSION: [Stage; 10] = [
        Stage::Config,
        Stage::Dns,
        Stage::Tcp,
        Stage::Tls,
        Stage::Greeting,
        Stage::Ehlo,
        Stage::Starttls,
        Stage::Token,
        Stage::Auth,
        Stage::Graph,
    ];

    /// The failure is Panel's own (its settings, a file or variable it reads, a bug), found
    /// before or without the relay saying anything: never to be worded as the relay's reply.
    pub fn is_inside_panel(self) -> bool {
        matches!(self, Stage::Config | Stage::Internal | Stage::Policy)
    }

    /// The attempt got as far as this message's own transaction (MAIL, RCPT, DATA, QUIT).
    pub fn is_past_session(self) -> bool {
        matches!(self, Stage::Mail | Stage::Rcpt | Stage::Data | Stage::Quit)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.as_str().to_ascii_uppercase())
    }
}

/// A complete (possibly multi-line) SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SmtpReply {
    pub code: u16,
    /// RFC 3463 enhanced status code (`5.1.1`), when the relay sent one.
    pub enhanced: Option<String>,
    /// The text of every line, without code and enhanced code, joined by newlines.
    pub text: String,
}

impl SmtpReply {
    /// Builds a reply from its raw lines (`250-first`, `250 last`).
    pub fn from_lines(code: u16, lines: &[&str]) -> SmtpReply {
        let mut enhanced = None;
        let texts: Vec<&str> = lines
            .iter()
            .map(|line| {
                let rest = line.get(4..).unwrap_or("");
                match split_enhanced(rest, code) {
                    Some((e, t)) => {
                        enhanced.get_or_insert_with(|| e.to_string());
                        t
                    }
                    None => rest,
                }
            })
            .collect();
        SmtpReply { code, enhanced, text: texts.join("\n") }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// One line for logs and tables: `550 5.1.1 <x@y>: Recipient address rejected`.
    pub fn one_line(&self) -> String {
        let text = self.text.replace('\n', " ");
        match &self.enhanced {
            Some(e) => format!("{} {} {}", self.code, e, text),
            None => format!("{} {}", self.code, text),
        }
    }
}

impl fmt::Display for SmtpReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())
    }
}

/// `5.1.1 text` -> (`5.1.1`, `text`) when the class digit agrees with the reply code.
fn split_enhanced(rest: &str, code: u16) -> Option<(&str, &str)> {
    let (first, text) = rest.split_once(' ').unwrap_or((rest, ""));
    let mut parts = first.split('.');
    let class = parts.next()?;
    let ok = class.len() == 1
        && class.starts_with(char::from(b'0' + (code / 100) as u8))
        && parts.clone().count() == 2
        && parts.all(|p| !p.is_empty() && p.len() <= 3 && p.chars().all(|c| c.is_ascii_digit()));
    ok.then_some((first, text))
}

/// What went wrong at a stage, when it was not simply the relay's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The relay answered with a negative reply (see `reply`).
    Reply,
    /// Outside the recipient policy's allowed domains: never sent, never retried.
    PolicyRefused,
    Timeout,
    Dns,
    ConnectionRefused,
    /// Connection reset, closed unexpectedly, other socket errors.
    Io,
    TlsHandshake,
    /// The relay spoke plain SMTP where TLS was expected, or the reverse.
    TlsModeMismatch,
    CertificateUntrusted,
    StarttlsNotOffered,
    AuthNotOffered,
    /// A password would have gone over an unencrypted connection.
    PlaintextAuthRefused,
    /// The password file or variable, or the CA file, could not be read.
    LocalConfig,
    /// The relay broke the protocol (unparseable reply).
    Protocol,
    /// A stored credential cannot be used: missing, no license for it, detached, master key.
    Credential,
    /// The OAuth2 provider refused to issue a token (wrong secret, unknown client, consent).
    TokenRejected,
    /// The OAuth2 provider could not be reached or failed (network, 5xx): retried.
    TokenUnavailable,
    /// The relay refused a fresh OAuth2 token for good (see `reply`): permissions or delegation.
    TokenRefusedByRelay,
    /// Integrated authentication could not get a Kerberos ticket (no ticket, keytab, unknown
    /// principal, clock skew); the detail names the cause and the fix.
    Kerberos,
    /// No KDC answered: retried.
    KdcUnavailable,
    /// The relay ended the TLS handshake with an alert of its own (an internal error, not a
    /// version refusal): its TLS setup is failing. Retried.
    TlsAlert,
    /// No reply to the end of the message (a timeout or a closed connection after the final
    /// dot): the relay may have accepted it. Retried, and recorded as interrupted, since the
    /// retry may deliver a second copy.
    UnknownOutcome,
    /// The message is larger than the relay's declared SIZE limit: refused before sending.
    TooLarge,
    /// An address needs SMTPUTF8 and the relay does not offer it: refused before sending.
    NeedsSmtputf8,
    /// Panel's own delivery code failed (it panicked): a bug, not the relay. Retried on the
    /// retry schedule like a temporary failure, so a message that always trips it fails in the
    /// end instead of coming back after every lease.
    Internal,
}

/// A failed stage: the raw facts, before classification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub stage: Stage,
    pub kind: FailureKind,
    pub reply: Option<SmtpReply>,
    /// What happened, in words (never contains a secret).
    pub detail: String,
    /// How long the server asked to be left alone (HTTP `Retry-After`): no retry comes sooner.
    pub retry_after: Option<std::time::Duration>,
}

impl Failure {
    pub fn reply(stage: Stage, reply: SmtpReply) -> Failure {
        let detail = reply.one_line();
        Failure { stage, kind: FailureKind::Reply, reply: Some(reply), detail, retry_after: None }
    }

    pub fn new(stage: Stage, kind: FailureKind, detail: impl Into<String>) -> Failure {
        Failure { stage, kind, reply: None, detail: detail.into(), retry_after: None }
    }

    /// The failure of a whole transaction, carrying the reply of the recipient that decided it.
    pub fn with_reply_of(mut self, result: &crate::delivery::RecipientResult) -> Failure {
        if let crate::delivery::RecipientResult::Rejected(f) = result {
            self.reply = f.reply.clone();
            self.kind = f.kind;
        }
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage, self.detail)
    }
}

crate::string_enum!(
    /// What a failure means for the message: the stored and serialized name.
    FailureClass {
        /// Try again later (4xx, timeouts, connection and handshake failures).
        Transient = "transient",
        /// The relay refused for good (5xx for this message or recipient).
        Permanent = "permanent",
        /// Every message would fail the same way until an admin changes the settings or the relay.
        Configuration = "configuration",
        /// Panel itself failed while delivering (a bug): retried on the schedule, then failed.
        Internal = "internal",
    }
);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub class: FailureClass,
    pub hint: Option<String>,
}

/// Which port and mode the failing connection used: the same reply means different things.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionContext {
    pub port: u16,
    pub security: Security,
}

pub fn classify(failure: &Failure, ctx: ConnectionContext) -> Classification {
    use FailureClass::*;
    use FailureKind as K;
    let hint = hint(failure, ctx);
    if let Some(class) = known_reply(failure).and_then(|p| p.class) {
        return Classification { class, hint };
    }
    let class = match failure.kind {
        K::Reply if failure.stage == Stage::Graph => {
            graph_class(failure.reply.as_ref().expect("Reply failures carry the reply").code)
        }
        K::Reply => {
            let reply = failure.reply.as_ref().expect("Reply failures carry the reply");
            if reply.is_transient() {
                Transient
            } else {
                match failure.stage {
                    Stage::Auth | Stage::Greeting | Stage::Ehlo | Stage::Starttls => Configuration,
                    // 530: authentication (or STARTTLS) required before MAIL.
                    Stage::Mail if reply.code == 530 || is_auth_required(reply) => Configuration,
                    _ => Permanent,
                }
            }
        }
        K::Timeout if failure.stage == Stage::Greeting && is_tls_port_without_tls(ctx) => Configuration,
        K::Timeout
        | K::Dns
        | K::ConnectionRefused
        | K::Io
        | K::TlsHandshake
        | K::TlsAlert
        | K::Protocol
        | K::TokenUnavailable
        | K::UnknownOutcome
        | K::KdcUnavailable => Transient,
        K::Internal => Internal,
        K::TooLarge | K::NeedsSmtputf8 | K::PolicyRefused => Permanent,
        K::TlsModeMismatch
        | K::CertificateUntrusted
        | K::StarttlsNotOffered
        | K::AuthNotOffered
        | K::PlaintextAuthRefused
        | K::LocalConfig
        | K::Credential
        | K::TokenRejected
        | K::TokenRefusedByRelay
        | K::Kerberos => Configuration,
    };
    Classification { class, hint }
}

/// What Microsoft Graph's HTTP status means for the message: throttling and outages are
/// retried (429, 5xx); a refused token, app or mailbox needs the admin (401, 403, 404); any
/// other refusal is of this message (400: its MIME, 413: its size).
fn graph_class(status: u16) -> FailureClass {
    match status {
        429 | 500..=599 => FailureClass::Transient,
        401 | 403 | 404 => FailureClass::Configuration,
        _ => FailureClass::Permanent,
    }
}

/// The fix for a Graph refusal, by Graph's error code (in the reply text) and status.
fn graph_hint(reply: &SmtpReply) -> Option<String> {
    let text = reply.text.as_str();
    let s = |v: &str| Some(v.to_string());
    if text.contains("MailboxNotEnabledForRESTAPI") {
        return s(
            "the mailbox does not exist in Exchange Online, or has no Exchange Online licence (or is on-premises): \
             set --username to a licensed cloud mailbox (a shared mailbox needs no licence)",
        );
    }
    if text.contains("ErrorAccessDenied") {
        return s("the app may not send as this mailbox: it lacks the Mail.Send application permission (with admin \
             consent), or the mailbox is outside the app's RBAC for Applications scope or application access \
             policy in Exchange Online; add the mailbox to that scope (New-ManagementRoleAssignment -Role \
             \"Application Mail.Send\" ... -CustomResourceScope, or the policy's group), or send as a mailbox inside it");
    }
    if text.contains("ResourceNotFound") || text.contains("ErrorInvalidUser") || reply.code == 404 {
        return s("no such mailbox in this tenant: check --username (the mailbox's address or user principal name)");
    }
    match reply.code {
        401 => s("Graph refused the token: the app registration lacks the Mail.Send application permission, or admin \
             consent was not granted (Entra admin center > App registrations > API permissions > Grant admin consent)"),
        403 => {
            s("Graph refused the app: grant the Mail.Send application permission with admin consent, and check the \
             app's access policy for this mailbox")
        }
        429 => s(
            "Microsoft Graph is throttling this app or mailbox; Panel waits as long as it asks (Retry-After) and tries again",
        ),
        500..=599 => s("Microsoft Graph failed or is unavailable; the message is retried"),
        413 => {
            s("the message is too large for Microsoft Graph's sendMail: a request is limited to about 4 MB, so about \
             3 MB of message once base64-encoded; send less, or send large mail over an SMTP relay")
        }
        _ => s("Microsoft Graph refused this message as it is (see its error above); it is not retried"),
    }
}

/// What an Entra ID (AADSTS) error from the token endpoint means, when it is one admins meet.
fn aadsts_hint(detail: &str) -> Option<&'static str> {
    const KNOWN: &[(&str, &str)] = &[
        (
            "AADSTS7000215",
            "the client secret is wrong: store the secret's Value (not its Secret ID) again with `panel credential set`",
        ),
        (
            "AADSTS7000222",
            "the client secret has expired: create a new one in the app registration and store it with `panel credential set`",
        ),
        (
            "AADSTS700016",
            "no app with this client id in the tenant: check the credential's client id and tenant (`panel credential list`)",
        ),
        ("AADSTS90002", "no such tenant: check the credential's tenant (its directory id or domain)"),
        ("AADSTS900023", "the tenant is not a valid tenant id or domain: check the credential's tenant"),
        (
            "AADSTS65001",
            "admin consent has not been granted for the app's permissions: grant it in the app registration's API permissions",
        ),
        ("AADSTS7000112", "the app is disabled in the tenant: enable its enterprise application"),
        (
            "AADSTS700027",
            "the certificate assertion did not verify: the certificate uploaded to the app registration does not match the stored key",
        ),
    ];
    KNOWN.iter().find(|(code, _)| detail.contains(code)).map(|(_, hint)| *hint)
}

/// Port 465 is implicit TLS by registration (RFC 8314); silence there without TLS is the mode.
fn is_tls_port_without_tls(ctx: ConnectionContext) -> bool {
    ctx.port == 465 && ctx.security != Security::Tls
}

fn is_auth_required(reply: &SmtpReply) -> bool {
    reply.enhanced.as_deref() == Some("5.7.0") && reply.text.to_ascii_lowercase().contains("authentication required")
}

/// A reply of Microsoft 365 (Exchange Online) or Google that admins meet again and again,
/// recognised by its code, enhanced code and a distinctive part of its text; what it means is
/// taken from the provider's own documentation, and the hint says the fix.
#[derive(Debug)]
pub struct ProviderReply {
    pub code: u16,
    pub enhanced: &'static str,
    /// Lower case; the reply's text must contain it.
    pub contains: &'static str,
    /// Where the provider's meaning differs from the reply code's class: a quota that frees up
    /// within a day is retried although it is a 5xx; a refusal that no retry fixes (TLS below
    /// 1.2 on the path, an unregistered relay client) needs the admin although it is a 4xx or
    /// a recipient's 5xx.
    pub class: Option<FailureClass>,
    /// Whether the meaning holds when an OAuth2 token was refused too (SMTP AUTH turned off);
    /// the ones about passwords do not: a refused token has its own hint.
    pub for_tokens: bool,
    pub hint: &'static str,
}

/// Exchange Online's limit on one mailbox's concurrent SMTP sessions (two texts say it).
const CONCURRENCY_HINT: &str = "Exchange Online lets one mailbox send on at most 3 connections at once, and Panel \
     opened more: lower [worker] concurrency so that all running services together stay at 3 or fewer; the message \
     is retried";

/// Most specific first: the first entry that matches decides.
pub const PROVIDER_REPLIES: &[ProviderReply] = &[
    ProviderReply {
        code: 550,
        enhanced: "5.7.30",
        contains: "basic authentication is not supported",
        class: Some(FailureClass::Configuration),
        for_tokens: false,
        hint: "Microsoft 365 no longer accepts a password (Basic authentication) for SMTP client submission; \
               switch to OAuth2 (--auth oauth2 --oauth-provider microsoft) or to Microsoft Graph (--transport \
               graph), both with a stored Microsoft credential (README: Microsoft Graph)",
    },
    ProviderReply {
        code: 535,
        enhanced: "5.7.139",
        contains: "disabled for the tenant",
        class: None,
        for_tokens: true,
        hint: "SMTP AUTH is turned off for the whole Microsoft 365 tenant: an Exchange admin turns it on \
               (Set-TransportConfig -SmtpClientAuthenticationDisabled $false), or for this mailbox only \
               (Set-CASMailbox -Identity MAILBOX -SmtpClientAuthenticationDisabled $false); or send through \
               Microsoft Graph (--transport graph), which needs no SMTP AUTH",
    },
    ProviderReply {
        code: 535,
        enhanced: "5.7.139",
        contains: "disabled for the mailbox",
        class: None,
        for_tokens: true,
        hint: "SMTP AUTH is turned off for this mailbox: an Exchange admin turns it on with Set-CASMailbox \
               -Identity MAILBOX -SmtpClientAuthenticationDisabled $false (or Microsoft 365 admin center: \
               the user > Mail > Manage email apps > Authenticated SMTP); or send through Microsoft Graph \
               (--transport graph), which needs no SMTP AUTH",
    },
    ProviderReply {
        code: 535,
        enhanced: "5.7.139",
        contains: "security defaults",
        class: None,
        for_tokens: false,
        hint: "Microsoft Entra security defaults block password sign-in for SMTP on this tenant; use OAuth2 \
               (--auth oauth2 --oauth-provider microsoft), which they do not block",
    },
    ProviderReply {
        code: 535,
        enhanced: "5.7.139",
        contains: "authentication unsuccessful",
        class: None,
        for_tokens: false,
        hint: "Microsoft 365 refused this sign-in: the password is wrong, or a policy blocks password sign-in \
               for this account (MFA, Conditional Access, security defaults); check the credential, or use \
               OAuth2 (--auth oauth2 --oauth-provider microsoft)",
    },
    ProviderReply {
        code: 535,
        enhanced: "5.7.3",
        contains: "authentication unsuccessful",
        class: None,
        for_tokens: false,
        hint: "Exchange rejected the sign-in: check that --username is the mailbox's full address and the \
               password; if both are right, the tenant no longer allows password sign-in for SMTP AUTH: use \
               --auth oauth2 --oauth-provider microsoft",
    },
    ProviderReply {
        code: 530,
        enhanced: "5.7.57",
        contains: "not authenticated",
        class: Some(FailureClass::Configuration),
        for_tokens: false,
        hint: "Exchange Online accepts mail on its submission endpoint only after SMTP AUTH: set --auth oauth2 \
               --oauth-provider microsoft (or password); to relay without a mailbox, send to your tenant's MX \
               endpoint (DOMAIN.mail.protection.outlook.com, port 25) through a connector that allow-lists \
               this host's IP",
    },
    ProviderReply {
        code: 550,
        enhanced: "5.7.60",
        contains: "permissions to send as this sender",
        class: Some(FailureClass::Configuration),
        for_tokens: false,
        hint: "the mailbox Panel signs in as may not send as this From address: set --from to that mailbox's \
               address, or give the mailbox Send As permission on it (Add-RecipientPermission FROM -Trustee \
               MAILBOX -AccessRights SendAs)",
    },
    ProviderReply {
        code: 421,
        enhanced: "4.7.66",
        contains: "tls 1.0 and 1.1 are not supported",
        class: Some(FailureClass::Configuration),
        for_tokens: false,
        hint: "Exchange Online refuses TLS 1.0 and 1.1; Panel itself only speaks TLS 1.2 or newer, so something \
               between Panel and Microsoft (a TLS-inspecting proxy or firewall) re-encrypts with an old \
               version: fix or bypass it for this connection",
    },
    ProviderReply {
        code: 432,
        enhanced: "4.3.2",
        contains: "thread limit exceeded",
        class: None,
        for_tokens: false,
        hint: CONCURRENCY_HINT,
    },
    ProviderReply {
        code: 432,
        enhanced: "4.3.2",
        contains: "concurrent connection",
        class: None,
        for_tokens: false,
        hint: CONCURRENCY_HINT,
    },
    ProviderReply {
        code: 554,
        enhanced: "5.2.0",
        contains: "submissionquotaexceededexception",
        class: Some(FailureClass::Transient),
        for_tokens: false,
        hint: "the mailbox reached Exchange Online's sending limit (10,000 recipients a day; 30 messages a \
               minute): it sends again as the 24-hour window frees up, and the message is retried until \
               --give-up-after; for more volume, spread the mail over several mailboxes",
    },
    ProviderReply {
        code: 554,
        enhanced: "5.2.2",
        contains: "quotaexceededexception",
        class: Some(FailureClass::Configuration),
        for_tokens: false,
        hint: "the sending mailbox is full (Exchange keeps every message sent with SMTP AUTH in Sent Items): \
               empty it, or give Sent Items a retention policy that deletes old items",
    },
    ProviderReply {
        code: 421,
        enhanced: "4.7.0",
        contains: "tls required for rcpt domain",
        class: Some(FailureClass::Configuration),
        for_tokens: false,
        hint: "Google requires TLS for this recipient's domain (a TLS compliance setting), and this connection \
               is not encrypted: use --security starttls (port 587) or tls (465)",
    },
    ProviderReply {
        code: 550,
        enhanced: "5.4.5",
        contains: "sending limit exceeded",
        class: Some(FailureClass::Transient),
        for_tokens: false,
        hint: "the Google Workspace account reached its daily sending limit; it can send again within 24 hours, \
               and the message is retried until --give-up-after; for more volume use Google's SMTP relay \
               service (smtp-relay.gmail.com) or several accounts",
    },
    ProviderReply {
        code: 550,
        enhanced: "5.7.1",
        contains: "invalid credentials for relay",
        class: Some(FailureClass::Configuration),
        for_tokens: false,
        hint: "Google's SMTP relay service does not recognise this sender: register this host's public IP in the \
               Admin console (Apps > Google Workspace > Gmail > Routing > SMTP relay service), or require SMTP \
               authentication there and set --auth; the From address (or --helo-name) must be in one of your \
               Workspace domains",
    },
    ProviderReply {
        code: 530,
        enhanced: "5.7.0",
        contains: "authentication required",
        class: Some(FailureClass::Configuration),
        for_tokens: false,
        hint: "the relay requires authentication (Google: smtp.gmail.com always; smtp-relay.gmail.com when its \
               relay service is set to require SMTP authentication): set --auth oauth2 --oauth-provider google \
               (or password), or have this host's IP allow-listed",
    },
];

/// The known provider reply `reply` is, if any.
pub fn provider_reply(reply: &SmtpReply) -> Option<&'static ProviderReply> {
    let enhanced = reply.enhanced.as_deref().unwrap_or("");
    let text = reply.text.to_ascii_lowercase();
    PROVIDER_REPLIES.iter().find(|p| p.code == reply.code && p.enhanced == enhanced && text.contains(p.contains))
}

/// The provider reply a failure carries, where its meaning applies to this kind of failure.
fn known_reply(failure: &Failure) -> Option<&'static ProviderReply> {
    let known = provider_reply(failure.reply.as_ref()?)?;
    match failure.kind {
        FailureKind::Reply => Some(known),
        FailureKind::TokenRefusedByRelay if known.for_tokens => Some(known),
        _ => None,
    }
}

fn hint(failure: &Failure, ctx: ConnectionContext) -> Option<String> {
    use FailureKind as K;
    if let Some(known) = known_reply(failure) {
        return Some(known.hint.to_string());
    }
    let port = ctx.port;
    let h = |s: &str| Some(s.to_string());
    match failure.kind {
        K::Dns => h("the relay's host name does not resolve from this machine; check --host and this host's DNS"),
        K::ConnectionRefused => Some(format!(
            "nothing accepts connections on port {port}; check --host and --port, that the relay runs, and firewalls"
        )),
        K::Timeout => match failure.stage {
            Stage::Tcp => h("the relay did not accept the TCP connection in time; a firewall may drop the traffic"),
            // What the hint says must match the class: on 465 without TLS this is a
            // configuration error; elsewhere it may be load, so it is retried.
            Stage::Greeting if is_tls_port_without_tls(ctx) => Some(format!(
                "the relay accepted the connection but sent no greeting: port {port} expects implicit TLS; set --security tls"
            )),
            Stage::Greeting if ctx.security != Security::Tls => Some(format!(
                "the relay accepted the connection but sent no greeting in time; the message is retried. If this repeats, port {port} may expect implicit TLS: set --security tls"
            )),
            Stage::Greeting => h(
                "the TLS handshake succeeded but the relay sent no greeting in time; it may be overloaded; the message is retried",
            ),
            _ => h("the relay stopped answering; it may be overloaded, or a firewall cuts idle connections"),
        },
        K::TlsModeMismatch => Some(match ctx.security {
            Security::Tls => format!(
                "port {port} speaks plain SMTP, not implicit TLS; use --security starttls (or use the relay's implicit-TLS port, usually 465)"
            ),
            _ => format!("port {port} expects implicit TLS but the mode is {}; set --security tls", ctx.security),
        }),
        K::CertificateUntrusted => h(
            "the relay's certificate is not trusted; give the CA that issued it with --ca-file, or pin this certificate with --pin-sha256 (the fingerprint is shown by `panel smtp check`)",
        ),
        K::TlsHandshake => {
            h("the TLS handshake failed; the relay may require an older TLS version than 1.2 or a different mode")
        }
        K::StarttlsNotOffered => Some(format!(
            "the relay did not offer STARTTLS on port {port}; use its TLS port (--security tls, usually 465), or --security opportunistic/none only if the network path is trusted"
        )),
        K::AuthNotOffered => h(
            "the relay offered no authentication; if it allow-lists this host's IP, set --auth none; some relays offer AUTH only after STARTTLS",
        ),
        K::PlaintextAuthRefused => h(
            "the password would have been sent unencrypted because the relay did not offer STARTTLS; use --security starttls or tls, or set --allow-plaintext-auth true if you accept that",
        ),
        K::LocalConfig => {
            h("fix the file or environment variable named above; the service reads it before every connection")
        }
        K::Io | K::Protocol => h("the connection broke; if it repeats, check the relay's log for this time"),
        K::PolicyRefused => h(
            "this installation's recipient policy allows only the domains named above; add the domain with \
             --allowed-domains, or send to an address inside them",
        ),
        K::Credential => h(
            "fix the stored credential named above (`panel credential list`, `panel license list`); messages held by it are sent again by themselves when the credential or a license changes",
        ),
        K::TokenRejected => aadsts_hint(&failure.detail).map(String::from).or_else(|| h(
            "the identity provider refused to issue a token: check the tenant, client id and secret (or the service account key and its domain-wide delegation) and store them again with `panel credential set`",
        )),
        K::TokenRefusedByRelay => h(
            "the relay refused the OAuth2 token: for Microsoft 365 check the app's SMTP.SendAsApp permission, its Exchange service principal and mailbox permission, and that SMTP AUTH is enabled for the mailbox; for Google check the domain-wide delegation of https://mail.google.com/ and that --username is a mailbox of the domain",
        ),
        K::TokenUnavailable => {
            h("the identity provider could not be reached or failed; the message is retried with backoff")
        }
        K::Kerberos => h(
            "fix the Kerberos cause named above; held messages are sent again by themselves when the keytab changes, the settings are saved or `panel smtp check` passes",
        ),
        K::KdcUnavailable => h("no Kerberos KDC answered; the message is retried with backoff"),
        K::TlsAlert => h(
            "the relay's TLS setup failed (see the alert above): check its certificate, key and TLS configuration in the relay's log; the message is retried",
        ),
        K::Internal => h(
            "Panel itself failed while delivering this message (a bug, not the relay); it is kept and retried on the retry schedule. Please report the detail with `panel messages show ID`",
        ),
        K::UnknownOutcome if failure.stage == Stage::Graph => h(
            "Microsoft Graph got the request but did not answer in time; it may have accepted the message, so the \
             retry can deliver a second copy: check the mailbox's Sent Items for it",
        ),
        K::UnknownOutcome => h(
            "the relay got the whole message but did not answer in time (content scanning can take minutes; see --data-timeout); it may have accepted it, so the retry can deliver a second copy: check the relay's log for this Message-ID",
        ),
        K::TooLarge => h(
            "the relay refuses messages this large; send less (smaller attachments), or raise the relay's message size limit",
        ),
        K::NeedsSmtputf8 => h(
            "this relay cannot carry internationalized (UTF-8) addresses; use an ASCII address for this recipient, or a relay that offers SMTPUTF8",
        ),
        K::Reply => reply_hint(failure.stage, failure.reply.as_ref()?),
    }
}

fn reply_hint(stage: Stage, reply: &SmtpReply) -> Option<String> {
    if stage == Stage::Graph {
        return graph_hint(reply);
    }
    let text = reply.text.to_ascii_lowercase();
    let enhanced = reply.enhanced.as_deref().unwrap_or("");
    let s = |v: &str| Some(v.to_string());
    if reply.code == 421 {
        return s(
            "the relay is closing connections (overloaded, shutting down, or rate limiting this host); messages are retried",
        );
    }
    match stage {
        Stage::Auth if reply.code == 535 || enhanced == "5.7.8" => {
            s("the relay rejected the username or password; check --username and the password source")
        }
        Stage::Auth if reply.code == 454 => {
            s("the relay could not check the credentials right now (temporary); it is retried")
        }
        Stage::Auth if reply.code == 504 => s("the relay does not support this authentication mechanism"),
        Stage::Auth if reply.code == 530 || reply.code == 538 => {
            s("the relay requires encryption before authentication; use --security starttls or tls")
        }
        Stage::Mail if reply.code == 530 && text.contains("starttls") => {
            s("the relay requires STARTTLS before sending; use --security starttls")
        }
        Stage::Mail if reply.code == 530 || text.contains("authentication required") => s(
            "the relay requires authentication from this host; set --auth password, or ask for this host's IP to be allow-listed",
        ),
        Stage::Mail if reply.is_permanent() => s(
            "the relay refuses this sender; check that the From address is one the relay lets this host or account send as",
        ),
        Stage::Rcpt
            if text.contains("relay access denied") || text.contains("relaying denied") || enhanced == "5.7.1" =>
        {
            s(
                "relay access denied: this host's IP is not allow-listed on the relay for this destination, or the relay needs authentication (--auth password)",
            )
        }
        Stage::Rcpt if enhanced == "5.1.1" || reply.code == 550 => {
            s("the recipient's mailbox does not exist or does not accept mail; check the address")
        }
        Stage::Greeting | Stage::Ehlo if reply.is_permanent() => {
            s("the relay refuses connections from this host; ask the relay's admin to allow this host's IP")
        }
        Stage::Data if reply.code == 552 || enhanced.starts_with("5.3.4") => {
            s("the message is too large for the relay")
        }
        Stage::Data if reply.is_permanent() => s("the relay refused the message content (policy or content filter)"),
        _ if reply.is_transient() => s("the relay refused temporarily; the message is retried with backoff"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, line: &str) -> SmtpReply {
        SmtpReply::from_lines(code, &[line])
    }

    const STARTTLS_587: ConnectionContext = ConnectionContext { port: 587, security: Security::Starttls };

    #[test]
    fn parses_enhanced_codes_and_multiline_text() {
        let r = SmtpReply::from_lines(550, &["550-5.1.1 <x@example.org>:", "550 5.1.1 Recipient address rejected"]);
        assert_eq!(r.enhanced.as_deref(), Some("5.1.1"));
        assert_eq!(r.text, "<x@example.org>:\nRecipient address rejected");
        assert_eq!(r.one_line(), "550 5.1.1 <x@example.org>: Recipient address rejected");
        let r = reply(250, "250 mail.example.org");
        assert_eq!(r.enhanced, None);
        assert_eq!(r.text, "mail.example.org");
        // A class digit that disagrees with the code is text, not an enhanced code.
        assert_eq!(reply(250, "250 5.1.1 odd").enhanced, None);
    }

    #[test]
    fn four_hundreds_are_transient_everywhere() {
        for stage in [Stage::Greeting, Stage::Mail, Stage::Rcpt, Stage::Data, Stage::Auth] {
            let f = Failure::reply(stage, reply(451, "451 4.3.0 try later"));
            assert_eq!(classify(&f, STARTTLS_587).class, FailureClass::Transient, "{stage:?}");
        }
    }

    #[test]
    fn five_hundreds_fail_the_message_at_once() {
        let f = Failure::reply(Stage::Rcpt, reply(550, "550 5.1.1 <nobody@example.org>: Recipient address rejected"));
        let c = classify(&f, STARTTLS_587);
        assert_eq!(c.class, FailureClass::Permanent);
        assert!(c.hint.unwrap().contains("does not exist"));
    }

    #[test]
    fn relay_access_denied_points_at_the_allow_list() {
        let f = Failure::reply(Stage::Rcpt, reply(554, "554 5.7.1 <a@b.org>: Relay access denied"));
        assert!(classify(&f, STARTTLS_587).hint.unwrap().contains("allow-listed"));
    }

    #[test]
    fn authentication_failures_are_configuration_errors_but_454_is_retried() {
        let f = Failure::reply(Stage::Auth, reply(535, "535 5.7.8 Error: authentication failed"));
        let c = classify(&f, STARTTLS_587);
        assert_eq!(c.class, FailureClass::Configuration);
        assert!(c.hint.unwrap().contains("username or password"));
        let f = Failure::reply(Stage::Auth, reply(454, "454 4.7.0 Temporary authentication failure"));
        assert_eq!(classify(&f, STARTTLS_587).class, FailureClass::Transient);
    }

    #[test]
    fn tls_mode_mismatch_is_a_configuration_error_with_the_fix() {
        let ctx = ConnectionContext { port: 465, security: Security::Starttls };
        let f = Failure::new(Stage::Greeting, FailureKind::Timeout, "no greeting within 5s");
        let c = classify(&f, ctx);
        assert_eq!(c.class, FailureClass::Configuration);
        assert!(c.hint.unwrap().contains("--security tls"));

        let ctx = ConnectionContext { port: 587, security: Security::Tls };
        let f = Failure::new(Stage::Tls, FailureKind::TlsModeMismatch, "relay answered in plain text");
        let c = classify(&f, ctx);
        assert_eq!(c.class, FailureClass::Configuration);
        assert!(c.hint.unwrap().contains("--security starttls"));
    }

    #[test]
    fn network_failures_are_retried() {
        for kind in [FailureKind::ConnectionRefused, FailureKind::Dns, FailureKind::Io, FailureKind::TlsHandshake] {
            let f = Failure::new(Stage::Tcp, kind, "x");
            assert_eq!(classify(&f, STARTTLS_587).class, FailureClass::Transient, "{kind:?}");
        }
        let f = Failure::new(Stage::Greeting, FailureKind::Timeout, "x");
        assert_eq!(classify(&f, STARTTLS_587).class, FailureClass::Transient);
    }

    #[test]
    fn untrusted_certificate_and_missing_starttls_need_the_admin() {
        let f = Failure::new(Stage::Tls, FailureKind::CertificateUntrusted, "unknown issuer");
        let c = classify(&f, STARTTLS_587);
        assert_eq!(c.class, FailureClass::Configuration);
        assert!(c.hint.unwrap().contains("--pin-sha256"));
        let f = Failure::new(Stage::Ehlo, FailureKind::StarttlsNotOffered, "no STARTTLS in EHLO");
        assert_eq!(classify(&f, STARTTLS_587).class, FailureClass::Configuration);
    }

    #[test]
    fn token_failures_split_into_configuration_and_retry() {
        let f = Failure::new(Stage::Token, FailureKind::TokenRejected, "HTTP 401 invalid_client");
        let c = classify(&f, STARTTLS_587);
        assert_eq!(c.class, FailureClass::Configuration);
        assert!(c.hint.unwrap().contains("panel credential set"));
        let f = Failure::new(Stage::Token, FailureKind::TokenUnavailable, "HTTP 503");
        assert_eq!(classify(&f, STARTTLS_587).class, FailureClass::Transient);
        let f = Failure::new(Stage::Auth, FailureKind::Credential, "no license grants credential-storage");
        assert_eq!(classify(&f, STARTTLS_587).class, FailureClass::Configuration);
        let f = Failure {
            kind: FailureKind::TokenRefusedByRelay,
            ..Failure::reply(Stage::Auth, reply(535, "535 5.7.3 Authentication unsuccessful"))
        };
        let c = classify(&f, STARTTLS_587);
        assert_eq!(c.class, FailureClass::Configuration);
        assert!(c.hint.unwrap().contains("SMTP.SendAsApp"));
    }

    #[test]
    fn stage_names_round_trip() {
        for s in ["config", "tcp", "token", "rcpt", "data"] {
            assert_eq!(Stage::parse(s).unwrap().as_str(), s);
        }
        assert_eq!(Stage::Rcpt.to_string(), "RCPT");
    }

    #[test]
    fn a_greeting_timeout_is_classified_as_its_hint_says_on_every_port_and_mode() {
        let timeout = Failure::new(Stage::Greeting, FailureKind::Timeout, "no greeting within 30s");
        for port in [25, 465, 587, 2525] {
            for security in Security::VARIANTS.iter().copied() {
                let c = classify(&timeout, ConnectionContext { port, security });
                let hint = c.hint.expect("a greeting timeout always has a hint");
                match c.class {
                    FailureClass::Configuration => {
                        assert_eq!((port, security == Security::Tls), (465, false));
                        assert!(hint.contains("set --security tls") && !hint.contains("retried"), "{hint}");
                    }
                    FailureClass::Transient => {
                        assert!(hint.contains("retried"), "{port}/{security}: {hint}");
                        if security == Security::Tls {
                            assert!(!hint.contains("set --security tls"), "already tls: {hint}");
                        }
                    }
                    other => panic!("{port}/{security}: {other}"),
                }
            }
        }
    }

    /// Each provider reply, as the provider sends it, with the class it gets and a word its hint
    /// must carry. The texts are the documented ones (see `PROVIDER_REPLIES`).
    #[test]
    fn the_big_providers_replies_get_their_documented_meaning_and_fix() {
        use FailureClass::*;
        let cases: &[(Stage, u16, &str, FailureClass, &str)] = &[
            (
                Stage::Auth,
                550,
                "5.7.30 Basic authentication is not supported for Client Submission.",
                Configuration,
                "--auth oauth2",
            ),
            (
                Stage::Auth,
                535,
                "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
                Configuration,
                "Set-TransportConfig",
            ),
            (
                Stage::Auth,
                535,
                "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information.",
                Configuration,
                "Set-CASMailbox",
            ),
            (
                Stage::Auth,
                535,
                "5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy. Contact your administrator.",
                Configuration,
                "security defaults",
            ),
            (
                Stage::Auth,
                535,
                "5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully.",
                Configuration,
                "Conditional Access",
            ),
            (
                Stage::Auth,
                535,
                "5.7.3 Authentication unsuccessful [BN6PR03CA0021.namprd03.prod.outlook.com]",
                Configuration,
                "full address",
            ),
            (
                Stage::Mail,
                530,
                "5.7.57 Client not authenticated to send mail. [BN1P110CA0052.NAMP110.PROD.OUTLOOK.COM]",
                Configuration,
                "mail.protection.outlook.com",
            ),
            (
                Stage::Data,
                550,
                "5.7.60 SMTP; Client does not have permissions to send as this sender [BY2PR1001MB1094.namprd10.prod.outlook.com]",
                Configuration,
                "Send As",
            ),
            (
                Stage::Greeting,
                421,
                "4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2.",
                Configuration,
                "proxy",
            ),
            (Stage::Mail, 432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", Transient, "concurrency"),
            (
                Stage::Mail,
                432,
                "4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information.",
                Transient,
                "concurrency",
            ),
            (
                Stage::Data,
                554,
                "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception",
                Transient,
                "10,000 recipients",
            ),
            (
                Stage::Data,
                554,
                "5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded",
                Configuration,
                "Sent Items",
            ),
            (
                Stage::Rcpt,
                421,
                "4.7.0 TLS required for RCPT domain, closing connection.",
                Configuration,
                "--security starttls",
            ),
            (
                Stage::Mail,
                550,
                "5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go to https://support.google.com/a/answer/166852",
                Transient,
                "24 hours",
            ),
            (
                Stage::Rcpt,
                550,
                "5.7.1 Invalid credentials for relay [203.0.113.10]. The IP address you've registered in your G Suite SMTP Relay service doesn't match domain of the account this email is being sent from.",
                Configuration,
                "SMTP relay service",
            ),
            (
                Stage::Mail,
                530,
                "5.7.0 Authentication Required. Learn more at https://support.google.com/mail/?p=WantAuthError",
                Configuration,
                "--auth oauth2 --oauth-provider google",
            ),
        ];
        for (stage, code, text, class, fix) in cases {
            let f = Failure::reply(*stage, reply(*code, &format!("{code} {text}")));
            let c = classify(&f, STARTTLS_587);
            assert_eq!(c.class, *class, "{code} {text}");
            let hint = c.hint.unwrap_or_default();
            assert!(hint.contains(fix), "{code} {text}: {hint}");
        }
        // An OAuth2 token refused for a documented reason gets that reason, not the general hint.
        let f = Failure {
            kind: FailureKind::TokenRefusedByRelay,
            ..Failure::reply(
                Stage::Auth,
                reply(
                    535,
                    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.",
                ),
            )
        };
        assert!(classify(&f, STARTTLS_587).hint.unwrap().contains("Set-CASMailbox"));
        // The same code with another text is not taken for it.
        let f = Failure::reply(Stage::Rcpt, reply(550, "550 5.7.1 <a@b.org>: Relay access denied"));
        assert!(classify(&f, STARTTLS_587).hint.unwrap().contains("allow-listed"));
        assert_eq!(classify(&f, STARTTLS_587).class, Permanent);
    }

    /// Graph answers with HTTP statuses, whose meaning is not SMTP's: a 4xx is mostly final, a
    /// 5xx retried; each of its documented refusals names its fix.
    #[test]
    fn graphs_answers_are_classified_by_their_http_status_and_error_code() {
        use FailureClass::*;
        let graph =
            |code: u16, text: &str| Failure::reply(Stage::Graph, SmtpReply { code, enhanced: None, text: text.into() });
        let cases: &[(u16, &str, FailureClass, &str)] = &[
            (429, "TooManyRequests: Application is over its MailboxConcurrency limit.", Transient, "Retry-After"),
            (503, "ServiceUnavailable: Service Unavailable", Transient, "retried"),
            (504, "GatewayTimeout", Transient, "retried"),
            (
                403,
                "ErrorAccessDenied: Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings.",
                Configuration,
                "application access policy",
            ),
            (
                404,
                "MailboxNotEnabledForRESTAPI: The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
                Configuration,
                "licence",
            ),
            (404, "ResourceNotFound: Resource could not be discovered.", Configuration, "--username"),
            (401, "InvalidAuthenticationToken: Access token validation failure.", Configuration, "Mail.Send"),
            (
                400,
                "ErrorMimeContentInvalidBase64String: Invalid base64 string for MIME content.",
                Permanent,
                "not retried",
            ),
            (413, "RequestEntityTooLarge", Permanent, "4 MB"),
        ];
        for (code, text, class, fix) in cases {
            let c = classify(&graph(*code, text), STARTTLS_587);
            assert_eq!(c.class, *class, "{code} {text}");
            assert!(c.hint.as_deref().unwrap_or_default().contains(fix), "{code} {text}: {:?}", c.hint);
        }
        // Entra's own refusals of the token name their fix.
        let f = Failure::new(
            Stage::Token,
            FailureKind::TokenRejected,
            "the token endpoint answered HTTP 401: invalid_client: AADSTS7000215: Invalid client secret provided.",
        );
        let c = classify(&f, STARTTLS_587);
        assert_eq!(c.class, Configuration);
        assert!(c.hint.unwrap().contains("Value (not its Secret ID)"));
        let f = Failure::new(
            Stage::Token,
            FailureKind::TokenRejected,
            "HTTP 401: invalid_client: AADSTS700027: Client assertion failed signature validation.",
        );
        assert!(classify(&f, STARTTLS_587).hint.unwrap().contains("certificate uploaded to the app registration"));
    }

    #[test]
    fn an_internal_failure_is_its_own_class_with_a_hint() {
        let f = Failure::new(Stage::Internal, FailureKind::Internal, "panicked: index out of bounds");
        let c = classify(&f, ConnectionContext { port: 587, security: Security::Starttls });
        assert_eq!(c.class, FailureClass::Internal);
        assert!(c.hint.unwrap().contains("a bug, not the relay"));
        assert_eq!(FailureClass::parse("internal"), Some(FailureClass::Internal));
    }
}
