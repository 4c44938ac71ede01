//! The relay settings, each declared once. From this one table come the stored document
//! (`SettingsDoc`) and its merge, the patch rules (which modes use a field), the `panel smtp
//! set` flags, the effective view that `smtp show --json` and the API return, the schema at
//! `GET /api/v1/settings/smtp/schema` that the web form renders from, and the configuration
//! reference in `docs/configuration.md` (a test compares the two).
//!
//! Adding a setting is one row here, its check in `RelaySettings::validate`, and its use.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{AuthMode, Security, Transport, validate_host};
use crate::address::{EmailAddress, Mailbox};
use crate::duration;
use crate::errors::{FieldError, FieldErrors};
use crate::policy::PolicyMode;
use crate::retry;

crate::string_enum!(
    /// The fieldsets of the settings form, in their order.
    Group {
        Delivery = "delivery" => "Delivery",
        Relay = "relay" => "Relay",
        Authentication = "authentication" => "Authentication",
        Messages = "messages" => "Messages",
        Policy = "policy" => "Recipient policy",
        Limits = "limits" => "Sending limits",
        Advanced = "advanced" => "Advanced",
    }
);

/// What a setting's value is: its JSON type, how a typed value is read, how the form shows it,
/// and how the effective view writes it (normalised, e.g. a host in lower case).
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Text,
    /// A file path on the service's machine.
    Path,
    /// A DNS name or IP address.
    Host,
    /// `Name <address>` or `address`.
    Mailbox,
    Address,
    /// An integer (the port).
    Number,
    /// true or false.
    Flag,
    Duration,
    /// A comma-separated list of durations.
    Durations,
    /// A SHA-256 fingerprint.
    Pin,
    /// The name of a stored credential (the form offers the stored names).
    CredentialName,
    /// One of a closed set: its values and labels.
    Choice(fn() -> Vec<(&'static str, &'static str)>),
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Path => "path",
            Kind::Host => "host",
            Kind::Mailbox => "mailbox",
            Kind::Address => "address",
            Kind::Number => "number",
            Kind::Flag => "boolean",
            Kind::Duration => "duration",
            Kind::Durations => "durations",
            Kind::Pin => "sha256",
            Kind::CredentialName => "credential",
            Kind::Choice(_) => "choice",
        }
    }
}

/// What an unset setting means.
#[derive(Debug, Clone, Copy)]
pub enum Default {
    /// The first save must give it.
    Required,
    /// Unset is unused (or, where the doc line says so, decided at run time).
    Unset,
    /// This value.
    Value(&'static str),
    /// Derived from other settings: `text` says how, `value` computes it for a document.
    Derived { text: &'static str, value: fn(&SettingsDoc) -> Option<Value> },
    /// Decided at run time, as `text` says (e.g. this host's name).
    Runtime(&'static str),
}

impl Default {
    /// The default as the reference, the `--help` text and the form's placeholder say it.
    pub fn text(self) -> &'static str {
        match self {
            Default::Required => "required",
            Default::Unset => "",
            Default::Value(v) => v,
            Default::Derived { text, .. } | Default::Runtime(text) => text,
        }
    }
}

/// Which modes use a setting; empty means every mode. Switching to a mode drops the fields it
/// does not use.
#[derive(Debug, Clone, Copy)]
pub struct Uses {
    pub transport: &'static [Transport],
    pub auth: &'static [AuthMode],
    pub security: &'static [Security],
    pub policy: &'static [PolicyMode],
}

const ANY: Uses = Uses { transport: &[], auth: &[], security: &[], policy: &[] };
/// The SMTP relay's own settings: Microsoft Graph does not use them.
const SMTP: Uses = Uses { transport: &[Transport::Smtp], ..ANY };
const GRAPH: Uses = Uses { transport: &[Transport::Graph], ..ANY };
const fn auth(modes: &'static [AuthMode]) -> Uses {
    Uses { auth: modes, ..ANY }
}
const TLS: &[Security] = &[Security::Tls, Security::Starttls, Security::Opportunistic];
const TLS_MODES: Uses = Uses { security: TLS, ..ANY };
const SMTP_TLS: Uses = Uses { transport: &[Transport::Smtp], security: TLS, ..ANY };
const REDIRECT: Uses = Uses { policy: &[PolicyMode::Redirect], ..ANY };

/// The modes a document is in: its transport, and the auth and security that decide which
/// fields apply (Graph always signs in with OAuth2 over TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes {
    pub transport: Transport,
    pub auth: AuthMode,
    pub security: Security,
    pub policy: PolicyMode,
}

impl Uses {
    pub fn transport_uses(&self, mode: Transport) -> bool {
        self.transport.is_empty() || self.transport.contains(&mode)
    }

    pub fn auth_uses(&self, mode: AuthMode) -> bool {
        self.auth.is_empty() || self.auth.contains(&mode)
    }

    pub fn security_uses(&self, mode: Security) -> bool {
        self.security.is_empty() || self.security.contains(&mode)
    }

    pub fn policy_uses(&self, mode: PolicyMode) -> bool {
        self.policy.is_empty() || self.policy.contains(&mode)
    }

    /// Whether a document in `modes` uses the setting.
    pub fn used(&self, modes: Modes) -> bool {
        self.transport_uses(modes.transport)
            && self.auth_uses(modes.auth)
            && self.security_uses(modes.security)
            && self.policy_uses(modes.policy)
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The key in the stored document, the API body, `smtp show --json` and the form.
    pub name: &'static str,
    pub kind: Kind,
    pub group: Group,
    /// The form's label.
    pub label: &'static str,
    pub default: Default,
    pub uses: Uses,
    /// One line: the `--help` text, the form's help and the reference's meaning.
    pub doc: &'static str,
    /// Settable only on the service's machine (the CLI), never through the API or the web UI:
    /// the setting makes the service read something local and send it (`patch::Channel`).
    pub local_only: bool,
    /// Belongs to the whole installation (the sender, the Fallback recipient, the recipient
    /// policy, the sending limits, the retry schedule), not to one route: a standby route
    /// takes it from the main settings and may not set its own.
    pub whole: bool,
}

/// A value as given: the JSON type a setting stores.
trait Given: Clone {
    /// An empty value in a patch clears the stored one back to its default.
    fn clears(&self) -> bool;
}

impl Given for String {
    fn clears(&self) -> bool {
        self.trim().is_empty()
    }
}

impl Given for i64 {
    fn clears(&self) -> bool {
        false
    }
}

impl Given for bool {
    fn clears(&self) -> bool {
        false
    }
}

fn pick<T: Given>(old: &Option<T>, new: &Option<T>) -> Option<T> {
    match new {
        Some(v) if v.clears() => None,
        Some(v) => Some(v.clone()),
        None => old.clone(),
    }
}

/// Reads a typed value (a CLI flag) into the JSON type the setting stores.
trait FromText: Sized {
    fn from_text(setting: &Setting, raw: &str) -> Result<Self, FieldError>;
}

impl FromText for String {
    fn from_text(_: &Setting, raw: &str) -> Result<Self, FieldError> {
        Ok(raw.to_string())
    }
}

impl FromText for i64 {
    fn from_text(s: &Setting, raw: &str) -> Result<Self, FieldError> {
        let range = if s.name == "port" { "; use 1-65535" } else { "" };
        raw.trim().parse().map_err(|_| FieldError::new(s.name, format!("'{raw}' is not a whole number{range}")))
    }
}

impl FromText for bool {
    fn from_text(s: &Setting, raw: &str) -> Result<Self, FieldError> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Ok(true),
            "false" | "no" | "0" => Ok(false),
            _ => Err(FieldError::new(s.name, format!("'{raw}' is not true or false"))),
        }
    }
}

macro_rules! settings_table {
    ($($(#[$doc:meta])* $name:ident: $ty:ty {
        kind: $kind:expr, group: $group:ident, label: $label:literal, default: $default:expr,
        uses: $uses:expr, $(local_only: $local:literal,)? $(whole: $whole:literal,)? doc: $help:literal $(,)?
    }),+ $(,)?) => {
        /// The settings document as stored and as edited: every field optional and loosely typed,
        /// so that a patch can name only what changes and validation can report every field's
        /// problem. Generated from the table.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct SettingsDoc {
            $($(#[$doc])*
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub $name: Option<$ty>,)+
            /// Set by Panel, never by a patch: the relay endpoint (`host:port/security`) the
            /// credential was confirmed for. When the endpoint changes the credential is detached
            /// until confirmed again.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub credential_relay: Option<String>,
            /// The standby routes, in the order they are tried after this one (the primary
            /// route): each holds only the settings of one route (`Setting::whole` false), with
            /// its own credential binding. Edited one route at a time (`patch::apply_route`),
            /// never by a patch of the main settings.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub routes: Option<Vec<super::RouteDoc>>,
        }

        /// Every relay setting, in the form's order.
        pub const SETTINGS: &[Setting] = &[$(Setting {
            name: stringify!($name),
            kind: $kind,
            group: Group::$group,
            label: $label,
            default: $default,
            uses: $uses,
            doc: $help,
            local_only: false $(|| $local)?,
            whole: false $(|| $whole)?,
        }),+];

        impl SettingsDoc {
            /// Applies `patch` on top of `self`: a field the patch names replaces the stored one;
            /// an empty string clears it back to its default. `credential_relay` is never taken
            /// from a patch.
            pub fn merged(&self, patch: &SettingsDoc) -> SettingsDoc {
                SettingsDoc {
                    $($name: pick(&self.$name, &patch.$name),)+
                    credential_relay: self.credential_relay.clone(),
                    routes: self.routes.clone(),
                }
            }

            /// The value of setting `name` as JSON, if it is set.
            pub fn get(&self, name: &str) -> Option<Value> {
                match name {
                    $(stringify!($name) => self.$name.as_ref().map(|v| json!(v)),)+
                    _ => None,
                }
            }

            /// Whether a patch names `name` with a value (not the empty value that clears it).
            pub fn names(&self, name: &str) -> bool {
                match name {
                    $(stringify!($name) => self.$name.as_ref().is_some_and(|v| !v.clears()),)+
                    _ => false,
                }
            }

            /// Unsets `name`.
            pub fn unset(&mut self, name: &str) {
                match name {
                    $(stringify!($name) => self.$name = None,)+
                    _ => {}
                }
            }

            /// A patch from typed values (`panel smtp set` flags): every bad value reported at once.
            pub fn from_texts<'a>(
                given: impl IntoIterator<Item = (&'a str, &'a str)>,
            ) -> Result<SettingsDoc, FieldErrors> {
                let mut doc = SettingsDoc::default();
                let mut errors = FieldErrors::default();
                for (name, raw) in given {
                    let Some(setting) = setting(name) else {
                        errors.push(name, "is not a relay setting");
                        continue;
                    };
                    match name {
                        $(stringify!($name) => doc.$name = errors.take(<$ty as FromText>::from_text(setting, raw)),)+
                        _ => {}
                    }
                }
                errors.into_result(|| doc)
            }
        }
    };
}

/// The CLI flag of a setting (without `--`): its name with dashes.
pub fn flag_name(setting: &Setting) -> String {
    setting.name.replace('_', "-")
}

pub fn setting(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

fn default_port(doc: &SettingsDoc) -> Option<Value> {
    let security = doc.security.as_deref().and_then(Security::parse).unwrap_or(Security::Starttls);
    Some(json!(security.default_port()))
}

fn default_redirect_to(doc: &SettingsDoc) -> Option<Value> {
    let fallback = EmailAddress::parse("fallback_recipient", doc.fallback_recipient.as_deref()?).ok()?;
    Some(json!(fallback.to_string()))
}

fn default_service_principal(doc: &SettingsDoc) -> Option<Value> {
    let host = validate_host("host", doc.host.as_deref()?).ok()?;
    Some(json!(format!("smtp/{host}")))
}

settings_table! {
    transport: String {
        kind: Kind::Choice(Transport::options), group: Delivery, label: "Delivery", default: Default::Value("smtp"),
        uses: ANY,
        doc: "smtp (an SMTP relay) or graph (Microsoft Graph sendMail, signed in as an Entra app)",
    },
    graph_endpoint: String {
        kind: Kind::Text, group: Delivery, label: "Graph endpoint", default: Default::Runtime("https://graph.microsoft.com"),
        uses: GRAPH,
        doc: "With graph: the Microsoft Graph endpoint, for a national cloud (https; plain http only to a loopback address)",
    },
    host: String {
        kind: Kind::Host, group: Relay, label: "Server", default: Default::Required, uses: SMTP,
        doc: "The relay's DNS name or IP address",
    },
    security: String {
        kind: Kind::Choice(Security::options), group: Relay, label: "Security", default: Default::Value("starttls"),
        uses: SMTP,
        doc: "tls (implicit TLS), starttls (required), opportunistic (STARTTLS when offered), or none",
    },
    port: i64 {
        kind: Kind::Number, group: Relay, label: "Port",
        default: Default::Derived { text: "from security: tls 465, starttls 587, opportunistic/none 25", value: default_port },
        uses: SMTP, doc: "The relay's port, 1-65535",
    },
    auth: String {
        kind: Kind::Choice(AuthMode::options), group: Authentication, label: "Authentication",
        default: Default::Value("none"), uses: SMTP,
        doc: "none (the relay allow-lists this host's IP), password, oauth2 (Microsoft 365, Google Workspace), \
              integrated (Kerberos with the service's own identity) or ntlm (a stored credential)",
    },
    username: String {
        kind: Kind::Text, group: Authentication, label: "Username", default: Default::Unset,
        uses: auth(&[AuthMode::Password, AuthMode::OAuth2]),
        doc: "The relay account for a password file or variable, or the mailbox Panel sends as with oauth2",
    },
    password_file: String {
        kind: Kind::Path, group: Authentication, label: "Password file", default: Default::Unset,
        uses: auth(&[AuthMode::Password]), local_only: true,
        doc: "A file holding the relay password, read before every connection, never stored; \
              set only with the CLI on the service's machine",
    },
    password_env: String {
        kind: Kind::Text, group: Authentication, label: "Password variable", default: Default::Unset,
        uses: auth(&[AuthMode::Password]), local_only: true,
        doc: "An environment variable of the service holding the relay password, read before every connection; \
              set only with the CLI on the service's machine",
    },
    /// A stored credential's name (`auth = password`, `oauth2` or `ntlm`).
    credential: String {
        kind: Kind::CredentialName, group: Authentication, label: "Stored credential", default: Default::Unset,
        uses: auth(&[AuthMode::Password, AuthMode::OAuth2, AuthMode::Ntlm]),
        doc: "A stored credential (panel credential list); naming it confirms it for this relay",
    },
    oauth_provider: String {
        kind: Kind::Choice(crate::oauth::OAuthProvider::options), group: Authentication, label: "OAuth2 provider",
        default: Default::Unset, uses: auth(&[AuthMode::OAuth2]),
        doc: "microsoft or google (with auth oauth2)",
    },
    token_endpoint: String {
        kind: Kind::Text, group: Authentication, label: "Token endpoint",
        default: Default::Runtime("the provider's"), uses: auth(&[AuthMode::OAuth2]),
        doc: "Overrides the provider's token endpoint (https; plain http only to a loopback address)",
    },
    /// `auth = integrated`: a keytab for `principal` instead of the default credential cache.
    keytab: String {
        kind: Kind::Path, group: Authentication, label: "Keytab (integrated)",
        default: Default::Runtime("the default credential cache"), uses: auth(&[AuthMode::Integrated]),
        doc: "With integrated: a keytab for the principal, instead of the service's default credential cache",
    },
    principal: String {
        kind: Kind::Text, group: Authentication, label: "Principal in the keytab", default: Default::Unset,
        uses: auth(&[AuthMode::Integrated]),
        doc: "With integrated: the service's principal in the keytab, e.g. panel/host.example.org@EXAMPLE.ORG",
    },
    /// `auth = integrated`: the relay's Kerberos service principal [default: smtp/HOST].
    service_principal: String {
        kind: Kind::Text, group: Authentication, label: "Relay's service principal",
        default: Default::Derived { text: "smtp/HOST", value: default_service_principal },
        uses: auth(&[AuthMode::Integrated]),
        doc: "With integrated: the relay's Kerberos service principal",
    },
    allow_plaintext_auth: bool {
        kind: Kind::Flag, group: Authentication, label: "Allow a password without encryption",
        default: Default::Value("false"), uses: SMTP,
        doc: "Allows sending a password or token over an unencrypted connection",
    },
    from: String {
        kind: Kind::Mailbox, group: Messages, label: "From address", default: Default::Required, uses: ANY,
        whole: true,
        doc: "The sender, Name <address> or address",
    },
    fallback_recipient: String {
        kind: Kind::Address, group: Messages, label: "Fallback recipient", default: Default::Required, uses: ANY,
        whole: true,
        doc: "Gets messages without a recipient, and the Test Message",
    },
    recipient_policy: String {
        kind: Kind::Choice(PolicyMode::options), group: Policy, label: "Recipients",
        default: Default::Value("deliver"), uses: ANY,
        whole: true,
        doc: "deliver (as addressed), redirect (every message to one address, the original recipients named in \
              the message) or capture (nothing sent, every message kept to read and download as .eml); the last two \
              for test installations",
    },
    redirect_to: String {
        kind: Kind::Address, group: Policy, label: "Redirect to",
        default: Default::Derived { text: "the Fallback recipient", value: default_redirect_to }, uses: REDIRECT,
        whole: true,
        doc: "With redirect: the address every message goes to",
    },
    allowed_domains: String {
        kind: Kind::Text, group: Policy, label: "Allowed domains", default: Default::Runtime("any domain"),
        uses: ANY,
        whole: true,
        doc: "Comma-separated domains (and their subdomains) mail may go to; any other recipient is refused at \
              enqueue and never sent to",
    },
    bounce_domain: String {
        kind: Kind::Host, group: Messages, label: "Bounce domain", default: Default::Unset, uses: ANY,
        whole: true,
        doc: "A domain whose mail reaches Panel's bounce listener (panel serve --bounce-listen): each message's \
              envelope sender becomes bounces+TOKEN@ this domain, and the relay is asked for DSNs, so a bounce \
              after the relay's 250 shows in the message log; unset, nothing changes on the wire",
    },
    /// Lets schedule and workflow steps set their own From address.
    allow_from_override: bool {
        kind: Kind::Flag, group: Messages, label: "Steps may set their own From", default: Default::Value("false"),
        uses: ANY, whole: true, doc: "Lets schedule and workflow steps set their own From address",
    },
    helo_name: String {
        kind: Kind::Host, group: Advanced, label: "EHLO name", default: Default::Runtime("this host's name"),
        uses: SMTP, doc: "The name sent in EHLO",
    },
    ca_file: String {
        kind: Kind::Path, group: Advanced, label: "CA file", default: Default::Unset, uses: TLS_MODES,
        doc: "PEM CA certificate(s) added to the system roots for the relay's certificate",
    },
    pin_sha256: String {
        kind: Kind::Pin, group: Advanced, label: "Certificate pin (SHA-256)", default: Default::Unset,
        uses: SMTP_TLS,
        doc: "Accepts exactly the certificate with this SHA-256 fingerprint (self-signed relays); smtp check prints it",
    },
    tls_server_name: String {
        kind: Kind::Host, group: Advanced, label: "TLS server name", default: Default::Runtime("the host"),
        uses: SMTP_TLS, doc: "The name to verify the certificate against when it differs from the host",
    },
    connect_timeout: String {
        kind: Kind::Duration, group: Advanced, label: "Connect timeout", default: Default::Value("10s"), uses: ANY,
        doc: "TCP connect and DNS, 1s to 10m",
    },
    command_timeout: String {
        kind: Kind::Duration, group: Advanced, label: "Command timeout", default: Default::Value("30s"), uses: ANY,
        doc: "Each SMTP reply and the TLS handshake, 1s to 10m",
    },
    messages_per_minute: i64 {
        kind: Kind::Number, group: Limits, label: "Messages per minute", default: Default::Runtime("no limit"),
        uses: ANY,
        doc: "At most this many messages by this route in any 60 seconds, every service together, 1-100000, 0 \
              for no limit; more wait in the queue instead of collecting the relay's throttling replies \
              (Exchange Online: 30 per mailbox)",
    },
    recipients_per_day: i64 {
        kind: Kind::Number, group: Limits, label: "Recipients per day", default: Default::Runtime("no limit"),
        uses: ANY,
        doc: "At most this many recipients by this route in any 24 hours, every service together, 1-10000000, \
              0 for no limit; more wait in the queue (Exchange Online: 10000 per mailbox)",
    },
    recipients_per_transaction: i64 {
        kind: Kind::Number, group: Advanced, label: "Recipients per transaction", default: Default::Value("100"),
        uses: SMTP,
        doc: "Most RCPTs in one SMTP transaction, 1-1000 (RFC 5321 has relays take at least 100); a message with \
              more recipients goes as several transactions, and a 452 'too many recipients' sends the rest at once \
              in the next",
    },
    data_timeout: String {
        kind: Kind::Duration, group: Advanced, label: "End-of-message timeout", default: Default::Value("10m"),
        uses: SMTP,
        doc: "The relay's reply after the whole message (RFC 5321: 10 minutes; content scanning takes time), 1s to 10m; \
              no reply in time is an unknown outcome",
    },
    retry_schedule: String {
        kind: Kind::Durations, group: Advanced, label: "Retry schedule", default: Default::Value(retry::DEFAULT_SCHEDULE),
        uses: ANY, whole: true, doc: "Delays between retries, the last repeating (with 10% jitter)",
    },
    give_up_after: String {
        kind: Kind::Duration, group: Advanced, label: "Give up after",
        default: Default::Value(retry::DEFAULT_GIVE_UP_AFTER), uses: ANY,
        whole: true,
        doc: "No attempt starts later than this after enqueue",
    },
}

/// The modes a document is in, with their defaults.
pub fn modes(doc: &SettingsDoc) -> Modes {
    let transport = doc.transport.as_deref().and_then(Transport::parse).unwrap_or(Transport::Smtp);
    let policy = doc.recipient_policy.as_deref().and_then(PolicyMode::parse).unwrap_or(PolicyMode::Deliver);
    if transport == Transport::Graph {
        return Modes { transport, auth: AuthMode::OAuth2, security: Security::Tls, policy };
    }
    let auth = doc.auth.as_deref().and_then(AuthMode::parse).unwrap_or(AuthMode::None);
    let security = doc.security.as_deref().and_then(Security::parse).unwrap_or(Security::Starttls);
    Modes { transport, auth, security, policy }
}

/// The settings in force with every default filled in, as `panel smtp show` and the API show
/// them: the fields the document's modes use, each normalised by its kind. `doc` must be valid.
/// Names where a password comes from, never a password.
pub fn effective(doc: &SettingsDoc) -> Map<String, Value> {
    let modes = modes(doc);
    let mut view = Map::new();
    for s in SETTINGS.iter().filter(|s| s.uses.used(modes)) {
        let value = match (doc.get(s.name), s.default) {
            (Some(v), _) => normalise(s.kind, v),
            (None, Default::Value(v)) => normalise(s.kind, typed_default(s.kind, v)),
            (None, Default::Derived { value, .. }) => value(doc).unwrap_or(Value::Null),
            (None, Default::Required | Default::Unset | Default::Runtime(_)) => Value::Null,
        };
        view.insert(s.name.to_string(), value);
    }
    view
}

fn typed_default(kind: Kind, text: &str) -> Value {
    match kind {
        Kind::Flag => Value::Bool(text == "true"),
        _ => Value::String(text.to_string()),
    }
}

/// A valid value in its canonical text: what validation accepted, written one way.
fn normalise(kind: Kind, value: Value) -> Value {
    let Value::String(text) = value else { return value };
    let t = text.trim();
    let canonical = match kind {
        Kind::Host => validate_host("", t).ok(),
        Kind::Mailbox => Mailbox::parse("", t).ok().map(|m| m.to_string()),
        Kind::Address => EmailAddress::parse("", t).ok().map(|a| a.to_string()),
        Kind::Duration => duration::parse(t).ok().map(duration::format),
        Kind::Durations => duration::parse_list(t).ok().map(|l| duration::format_list(&l)),
        Kind::Pin => super::parse_pin(t).ok().map(|p| super::format_pin(&p)),
        Kind::Choice(_) => Some(t.to_ascii_lowercase()),
        Kind::Text | Kind::Path | Kind::CredentialName | Kind::Number | Kind::Flag => Some(t.to_string()),
    };
    Value::String(canonical.unwrap_or_else(|| t.to_string()))
}

/// The table as JSON, for `GET /api/v1/settings/smtp/schema` and the web form: each setting's
/// name, type, label, group, default, the modes that use it and, for a choice, its options
/// (security options carry their default port, so the form's port hint needs no copy of it).
pub fn schema() -> Value {
    let settings: Vec<Value> = SETTINGS
        .iter()
        .map(|s| {
            let options = match s.kind {
                Kind::Choice(options) => Some(
                    options()
                        .into_iter()
                        .map(|(value, label)| {
                            let mut o = json!({"value": value, "label": label});
                            if let Some(sec) = Security::parse(value).filter(|_| s.name == "security") {
                                o["default_port"] = json!(sec.default_port());
                            }
                            o
                        })
                        .collect::<Vec<_>>(),
                ),
                Kind::Flag => {
                    Some(vec![json!({"value": "false", "label": "No"}), json!({"value": "true", "label": "Yes"})])
                }
                _ => None,
            };
            let default = match s.default {
                Default::Value(v) => Some(typed_default(s.kind, v)),
                _ => None,
            };
            // How a form's empty choice names the default: "default (starttls)", "default (no)".
            let default_label = match (s.kind, s.default) {
                (Kind::Flag, Default::Value(v)) => Some(if v == "true" { "yes" } else { "no" }),
                (_, Default::Value(v)) => Some(v),
                _ => None,
            };
            json!({
                "name": s.name,
                "flag": format!("--{}", flag_name(s)),
                "type": s.kind.as_str(),
                "group": s.group,
                "label": s.label,
                "doc": s.doc,
                "required": matches!(s.default, Default::Required),
                "default": default,
                "default_text": s.default.text(),
                "default_label": default_label,
                "options": options,
                "local_only": s.local_only,
                "whole": s.whole,
                "used_by": {
                    "transport": s.uses.transport.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                    "auth": s.uses.auth.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                    "security": s.uses.security.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                    "policy": s.uses.policy.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                },
            })
        })
        .collect();
    let groups: Vec<Value> = Group::VARIANTS.iter().map(|g| json!({"name": g, "label": g.label()})).collect();
    json!({"groups": groups, "settings": settings})
}

/// A hint as the web form says it. Hints are written once, naming `panel smtp set`'s flags
/// (the CLI shows them so); on a page each `--flag` of a relay setting becomes the field's label
/// ("Server"), and `--flag value` of a choice the label and the option ("Security: Implicit TLS").
/// Text in backticks (a command to run) is left as it is.
pub fn hint_for_form(hint: &str) -> String {
    let words: Vec<&str> = hint.split(' ').collect();
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    let mut in_code = false;
    let mut i = 0;
    while i < words.len() {
        let word = words[i];
        let starts_code = word.starts_with('`');
        let flag = word.trim_start_matches('`').strip_prefix("--");
        let found = flag.and_then(|f| {
            let name = f.trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-');
            SETTINGS.iter().find(|s| flag_name(s) == name).map(|s| (s, &f[name.len()..]))
        });
        match found {
            Some((setting, tail)) if !in_code && !starts_code => {
                let next = words.get(i + 1).map(|w| w.trim_end_matches([',', ';', '.', ')']));
                let option = match (setting.kind, tail.is_empty(), next) {
                    (Kind::Choice(options), true, Some(value)) => options().into_iter().find(|(v, _)| *v == value),
                    _ => None,
                };
                match option {
                    Some((value, label)) => {
                        let rest = &words[i + 1][value.len()..];
                        out.push(format!("{}: {label}{rest}", setting.label));
                        i += 1;
                    }
                    None => out.push(format!("\"{}\"{tail}", setting.label)),
                }
            }
            _ => out.push(word.to_string()),
        }
        // A backtick opens or closes a command; an even number leaves the state as it was.
        if word.matches('`').count() % 2 == 1 {
            in_code = !in_code;
        }
        i += 1;
    }
    out.join(" ")
}

/// The configuration reference's table of relay settings, as `docs/configuration.md` has it.
pub fn reference_markdown() -> String {
    let mut out = String::from("| option | meaning | default | used with |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let default = match s.default {
            Default::Unset => String::new(),
            Default::Required => "required".into(),
            Default::Value(v) => format!("`{v}`"),
            Default::Derived { text, .. } | Default::Runtime(text) => text.into(),
        };
        let mut used = Vec::new();
        if !s.uses.transport.is_empty() {
            used.push(s.uses.transport.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "));
        }
        if !s.uses.auth.is_empty() {
            used.push(format!("auth {}", s.uses.auth.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")));
        }
        if !s.uses.security.is_empty() {
            used.push(format!(
                "security {}",
                s.uses.security.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        if !s.uses.policy.is_empty() {
            used.push(format!(
                "recipient_policy {}",
                s.uses.policy.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        let used = match (s.whole, used.is_empty()) {
            (true, true) => "the whole installation".to_string(),
            (true, false) => format!("{}; the whole installation", used.join("; ")),
            (false, true) => "any; per route".to_string(),
            (false, false) => format!("{}; per route", used.join("; ")),
        };
        out.push_str(&format!("| `--{}` | {} | {default} | {used} |\n", flag_name(s), s.doc));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_has_a_distinct_name_a_label_and_a_doc_line() {
        let mut names: Vec<_> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len());
        for s in SETTINGS {
            assert!(!s.label.is_empty() && !s.doc.is_empty() && !s.doc.contains('\n'), "{}", s.name);
        }
    }

    #[test]
    fn the_configuration_reference_is_the_table() {
        let reference = include_str!("../../../../docs/configuration.md");
        let table = reference_markdown();
        assert!(
            reference.contains(&table),
            "docs/configuration.md disagrees with the settings table; replace its relay settings table with:\n{table}"
        );
    }

    #[test]
    fn typed_values_are_read_into_their_types_and_every_bad_one_is_reported() {
        let doc = SettingsDoc::from_texts([("port", "2525"), ("allow_plaintext_auth", "yes"), ("host", "r.example")])
            .unwrap();
        assert_eq!(
            (doc.port, doc.allow_plaintext_auth, doc.host.as_deref()),
            (Some(2525), Some(true), Some("r.example"))
        );
        let err = SettingsDoc::from_texts([("port", "x"), ("allow_from_override", "maybe")]).unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["port", "allow_from_override"]);
        assert!(err.0[0].message.contains("1-65535"));
    }

    #[test]
    fn effective_view_fills_defaults_and_shows_only_the_modes_fields() {
        let doc = SettingsDoc {
            host: Some("Relay.Example.org".into()),
            security: Some("TLS".into()),
            from: Some("Panel <panel@example.org>".into()),
            fallback_recipient: Some("ops@example.org".into()),
            pin_sha256: Some("AB:".repeat(31) + "AB"),
            ..SettingsDoc::default()
        };
        let view = effective(&doc);
        assert_eq!(view["host"], "relay.example.org");
        assert_eq!(view["security"], "tls");
        assert_eq!(view["port"], 465);
        assert_eq!(view["auth"], "none");
        assert_eq!(view["connect_timeout"], "10s");
        assert_eq!(view["allow_plaintext_auth"], false);
        assert_eq!(view["pin_sha256"], "ab".repeat(32));
        assert!(!view.contains_key("username") && !view.contains_key("keytab"), "{view:?}");
        let integrated = SettingsDoc { auth: Some("integrated".into()), security: Some("none".into()), ..doc };
        let view = effective(&integrated);
        assert_eq!(view["service_principal"], "smtp/relay.example.org");
        assert_eq!(view["port"], 25);
        assert!(!view.contains_key("pin_sha256"), "none uses no TLS: {view:?}");
    }

    #[test]
    fn a_hint_names_the_form_fields_on_a_page_and_the_flags_in_the_cli() {
        assert_eq!(
            hint_for_form("nothing accepts connections on port 2525; check --host and --port, that the relay runs"),
            "nothing accepts connections on port 2525; check \"Server\" and \"Port\", that the relay runs"
        );
        assert_eq!(
            hint_for_form("port 465 expects implicit TLS; set --security tls"),
            "port 465 expects implicit TLS; set Security: Implicit TLS"
        );
        assert_eq!(hint_for_form("use --auth oauth2 instead."), "use Authentication: OAuth2 instead.");
        // A command to run stays as it is typed, and unknown flags are left alone.
        let command = "confirm it: `panel smtp set --credential relay` or --no-such-flag";
        assert_eq!(hint_for_form(command), command);
    }

    #[test]
    fn schema_carries_options_defaults_and_modes() {
        let schema = schema();
        let settings = schema["settings"].as_array().unwrap();
        assert_eq!(settings.len(), SETTINGS.len());
        let security = settings.iter().find(|s| s["name"] == "security").unwrap();
        let tls = security["options"].as_array().unwrap().iter().find(|o| o["value"] == "tls").unwrap();
        assert_eq!(tls["default_port"], 465);
        let keytab = settings.iter().find(|s| s["name"] == "keytab").unwrap();
        assert_eq!(keytab["used_by"]["auth"], json!(["integrated"]));
        assert_eq!(keytab["flag"], "--keytab");
        let timeout = settings.iter().find(|s| s["name"] == "command_timeout").unwrap();
        assert_eq!(timeout["default"], "30s");
    }
}
