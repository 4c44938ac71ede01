//! Relay settings: the stored document (`SettingsDoc`, loose, as the admin wrote it) and the
//! validated value (`RelaySettings`) that the relay client uses. One validation function
//! serves save and load, and reports every problem at once.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub mod patch;
pub mod table;

pub use table::SettingsDoc;

use crate::address::{EmailAddress, Mailbox};
use crate::credential;
use crate::duration;
use crate::errors::{FieldError, FieldErrors, check_header_safe};
use crate::oauth::{EndpointUrl, OAuthProvider};
use crate::retry::RetryPolicy;

pub use crate::security::Security;

crate::string_enum!(
    /// How a message leaves Panel (the `transport` setting).
    Transport {
        Smtp = "smtp" => "SMTP relay",
        Graph = "graph" => "Microsoft Graph (sendMail)",
    }
);

/// Microsoft Graph's sendMail (`transport = graph`). The message goes as the MIME Panel builds,
/// so Exchange keeps a copy in the mailbox's Sent Items: Graph's `saveToSentItems` exists only
/// for JSON messages (microsoftgraph/microsoft-graph-docs#18698).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphSettings {
    /// `https://graph.microsoft.com` unless overridden (a national cloud, a local test double).
    pub endpoint: EndpointUrl,
}

/// Graph's public endpoint.
pub const GRAPH_ENDPOINT: &str = "https://graph.microsoft.com";

crate::string_enum!(
    /// How Panel proves itself to the relay (the `auth` setting).
    AuthMode {
        None = "none" => "None (allow-listed IP)",
        Password = "password" => "Password",
        OAuth2 = "oauth2" => "OAuth2",
        Integrated = "integrated" => "Integrated (Kerberos, the service's identity)",
        Ntlm = "ntlm" => "NTLM (stored credential)",
    }
);

/// Where the relay password comes from. Never the password itself: settings are readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    File(PathBuf),
    Env(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// The relay allow-lists this host's IP address.
    None,
    /// A password kept outside Panel, in a file or the service's environment.
    Password { username: String, source: PasswordSource },
    /// A username and password from Panel's credential store (license-gated).
    Stored { credential: String },
    /// SASL XOAUTH2 with a token from the provider; the client secret or key is a stored credential.
    OAuth2 { provider: OAuthProvider, mailbox: EmailAddress, credential: String, token_endpoint: Option<EndpointUrl> },
    /// SASL GSSAPI with the service's own Kerberos identity: the default credential cache, or
    /// `keytab` for `principal`. Panel stores no secret. The relay is `service_principal`
    /// (default `smtp/HOST`).
    Integrated { keytab: Option<PathBuf>, principal: Option<String>, service_principal: Option<String> },
    /// SASL NTLM (NTLMv2) with a stored password credential (license-gated like any).
    Ntlm { credential: String },
}

impl Auth {
    pub fn mode(&self) -> AuthMode {
        match self {
            Auth::None => AuthMode::None,
            Auth::Password { .. } | Auth::Stored { .. } => AuthMode::Password,
            Auth::OAuth2 { .. } => AuthMode::OAuth2,
            Auth::Integrated { .. } => AuthMode::Integrated,
            Auth::Ntlm { .. } => AuthMode::Ntlm,
        }
    }

    pub fn as_str(&self) -> &'static str {
        self.mode().as_str()
    }

    /// The stored credential these settings use, if any.
    pub fn credential(&self) -> Option<&str> {
        match self {
            Auth::Stored { credential } | Auth::OAuth2 { credential, .. } | Auth::Ntlm { credential } => {
                Some(credential)
            }
            Auth::None | Auth::Password { .. } | Auth::Integrated { .. } => None,
        }
    }
}

/// The name of the first route: the main settings' own relay.
pub const PRIMARY: &str = "primary";

/// A standby route as stored: its name and its own settings (only the per-route ones).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteDoc {
    pub name: String,
    pub settings: SettingsDoc,
}

/// A validated standby route: its settings are whole (the installation's sender, policy,
/// limits and retry schedule, with this route's relay, credential, TLS and timeouts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyRoute {
    pub name: String,
    pub settings: RelaySettings,
}

/// Most standby routes: failover is for a second (or third) relay, not for a relay farm.
pub const MAX_STANDBY: usize = 4;

/// A route's name: what the logs, the message log and the CLI's `--route` say.
pub fn check_route_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = (1..=32).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if !ok {
        return Err(FieldError::new(
            field,
            format!("'{name}' is not a route name; use 1-32 lower-case letters, digits and dashes, e.g. standby"),
        ));
    }
    if name == PRIMARY {
        return Err(FieldError::new(
            field,
            "'primary' is the main settings' own route; change it without --route, or name the standby otherwise",
        ));
    }
    Ok(())
}

/// The whole document of a standby route: the main document's installation-wide settings with
/// the route's own, and the route's credential binding.
pub fn route_doc(main: &SettingsDoc, route: &SettingsDoc) -> SettingsDoc {
    let mut doc = main.clone();
    doc.routes = None;
    for s in table::SETTINGS.iter().filter(|s| !s.whole) {
        doc.unset(s.name);
    }
    let mut doc = doc.merged(&route_part(route));
    doc.credential_relay = route.credential_relay.clone();
    doc
}

/// What a standby route stores of a whole document: its per-route settings and binding.
pub fn route_part(doc: &SettingsDoc) -> SettingsDoc {
    let mut part = doc.clone();
    part.routes = None;
    for s in table::SETTINGS.iter().filter(|s| s.whole) {
        part.unset(s.name);
    }
    part
}

/// Validated relay settings: every value here is safe to use as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    pub transport: Transport,
    /// With `Transport::Graph`: where and how; `host`, `port` and `security` then describe the
    /// Graph endpoint (for logs and the credential's binding), and `auth` is its OAuth2 sign-in.
    pub graph: Option<GraphSettings>,
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub auth: Auth,
    pub from: Mailbox,
    pub fallback_recipient: EmailAddress,
    pub helo_name: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub pin_sha256: Option<[u8; 32]>,
    pub tls_server_name: Option<String>,
    pub allow_plaintext_auth: bool,
    pub allow_from_override: bool,
    /// Where bounces go: each message's envelope sender is a VERP address of this domain.
    pub bounce_domain: Option<String>,
    /// Where mail may go: as addressed, or redirected; and to which domains.
    pub policy: crate::policy::RecipientPolicy,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// The wait for the relay's reply after the whole message (RFC 5321 4.5.3.2: 10 minutes);
    /// a message that gets no reply in time has an unknown outcome.
    pub data_timeout: Duration,
    /// Most RCPTs per SMTP transaction; more recipients go as several transactions.
    pub recipients_per_transaction: usize,
    /// The sending limits this route's relay enforces anyway, kept by Panel with one budget
    /// per route that every service shares.
    pub limits: SendLimits,
    pub retry: RetryPolicy,
    /// False when the stored credential was confirmed for another host, port or security mode:
    /// it is not sent until the admin confirms it for this endpoint.
    pub credential_attached: bool,
    /// The routes tried after this one, in order, when this one cannot be reached or refuses
    /// Panel (empty in a standby route's own settings).
    pub standby: Vec<StandbyRoute>,
    /// The document these settings were validated from, for the views the table renders.
    pub doc: SettingsDoc,
}

/// The sending limits (`messages_per_minute`, `recipients_per_day`): none by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendLimits {
    pub messages_per_minute: Option<u32>,
    pub recipients_per_day: Option<u32>,
}

impl SendLimits {
    pub fn any(&self) -> bool {
        self.messages_per_minute.is_some() || self.recipients_per_day.is_some()
    }

    /// The limits in words, for the note a held message carries and the dashboard.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.messages_per_minute {
            parts.push(format!("{n} messages a minute"));
        }
        if let Some(n) = self.recipients_per_day {
            parts.push(format!("{n} recipients a day"));
        }
        parts.join(", ")
    }
}

/// Where a stored secret goes, as the credential's binding records it: the relay endpoint
/// (`host:port/security`) and, when the token endpoint is overridden, the URL the OAuth client
/// secret is posted to. Every setting that can send a secret somewhere else is part of it, so
/// changing any of them detaches the credential.
pub fn endpoint_key(host: &str, port: u16, security: Security, token_endpoint: Option<&EndpointUrl>) -> String {
    match token_endpoint {
        None => format!("{host}:{port}/{security}"),
        Some(url) => format!("{host}:{port}/{security} with token endpoint {url}"),
    }
}

impl RelaySettings {
    /// The files Panel reads at send time that an admin fixes outside Panel: the password
    /// file, the keytab, the CA file. A change to one is a fix held messages may wait for.
    pub fn outside_files(&self) -> Vec<&std::path::Path> {
        let mut files = Vec::new();
        match &self.auth {
            Auth::Password { source: PasswordSource::File(f), .. } => files.push(f.as_path()),
            Auth::Integrated { keytab: Some(k), .. } => files.push(k.as_path()),
            _ => {}
        }
        files.extend(self.ca_file.as_deref());
        files
    }

    pub fn endpoint(&self) -> String {
        let token_endpoint = match &self.auth {
            Auth::OAuth2 { token_endpoint, .. } => token_endpoint.as_ref(),
            _ => None,
        };
        match &self.graph {
            // The bearer token goes to the Graph endpoint, path and all.
            Some(g) => match token_endpoint {
                None => format!("graph {}", g.endpoint),
                Some(url) => format!("graph {} with token endpoint {url}", g.endpoint),
            },
            None => endpoint_key(&self.host, self.port, self.security, token_endpoint),
        }
    }

    /// Whether a stored credential may be sent under these settings when it was confirmed for
    /// `binding` (a document's `credential_relay`): always without one, else only to where it was
    /// confirmed (`endpoint`, token endpoint included).
    pub fn bound_to(&self, binding: Option<&str>) -> bool {
        self.auth.credential().is_none() || binding == Some(self.endpoint().as_str())
    }

    /// The name the relay's certificate must carry.
    pub fn tls_name(&self) -> &str {
        self.tls_server_name.as_deref().unwrap_or(&self.host)
    }

    /// Every route in order: the primary (these settings) first, then the standbys.
    pub fn routes(&self) -> impl Iterator<Item = (&str, &RelaySettings)> {
        std::iter::once((PRIMARY, self)).chain(self.standby.iter().map(|r| (r.name.as_str(), &r.settings)))
    }

    /// The single validation used on save, on load and before every send: the main settings
    /// and every standby route, each route's problems named `routes.NAME.FIELD`.
    pub fn validate(doc: &SettingsDoc) -> Result<RelaySettings, FieldErrors> {
        let main = Self::validate_route(doc);
        let mut errors = main.as_ref().err().cloned().unwrap_or_default();
        let routes = doc.routes.as_deref().unwrap_or_default();
        if routes.len() > MAX_STANDBY {
            errors.push("routes", format!("{} standby routes; at most {MAX_STANDBY}", routes.len()));
        }
        let mut standby = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let field = |f: &str| format!("routes.{}.{f}", route.name);
            if let Err(e) = check_route_name("routes", &route.name) {
                errors.0.push(e);
                continue;
            }
            if routes[..i].iter().any(|r| r.name == route.name) {
                errors.push("routes", format!("two routes are named '{}'", route.name));
            }
            for s in table::SETTINGS.iter().filter(|s| s.whole && route.settings.get(s.name).is_some()) {
                errors.push(field(s.name), "belongs to the whole installation; set it without --route");
            }
            match Self::validate_route(&route_doc(doc, &route.settings)) {
                Ok(settings) => standby.push(StandbyRoute { name: route.name.clone(), settings }),
                // The installation-wide fields' problems are the main settings' own, said once.
                Err(e) => errors.0.extend(
                    e.0.into_iter()
                        .filter(|e| table::setting(&e.field).is_none_or(|s| !s.whole))
                        .map(|e| FieldError::new(field(&e.field), e.message)),
                ),
            }
        }
        match main {
            Ok(mut settings) if errors.is_empty() => {
                settings.standby = standby;
                Ok(settings)
            }
            _ => Err(errors),
        }
    }

    /// One route's settings, the installation-wide ones included.
    fn validate_route(doc: &SettingsDoc) -> Result<RelaySettings, FieldErrors> {
        let mut errors = FieldErrors::default();

        let transport = match doc.transport.as_deref() {
            None => Some(Transport::Smtp),
            Some(v) => errors.take(Transport::parse(v).ok_or_else(|| {
                FieldError::new("transport", format!("'{v}' is not a transport; use smtp (a relay) or graph"))
            })),
        };
        let graph = match transport {
            Some(Transport::Graph) => Some(graph_settings(doc, &mut errors)),
            _ => None,
        };
        let (host, security, port) = match &graph {
            // The Graph endpoint stands where the relay would: logs and the binding name it.
            Some(g) => {
                let url = g.as_ref().map(|g| &g.endpoint);
                let security = url.map(|u| if u.tls { Security::Tls } else { Security::None });
                (url.map(|u| u.host.clone()), security, url.map(|u| u.port))
            }
            None => smtp_endpoint(doc, &mut errors),
        };
        let graph = graph.flatten();
        let from = match doc.from.as_deref() {
            None => {
                errors.push("from", "is required; give the sender like 'Identity Panel <panel@example.org>' (--from)");
                None
            }
            Some(v) => errors.take(Mailbox::parse("from", v)),
        };
        let fallback_recipient = match doc.fallback_recipient.as_deref() {
            None => {
                errors.push(
                    "fallback_recipient",
                    "is required; it receives messages without a recipient and the test message (--fallback-recipient)",
                );
                None
            }
            Some(v) => errors.take(EmailAddress::parse("fallback_recipient", v)),
        };
        let auth = match transport {
            Some(Transport::Graph) => graph_auth(doc, &mut errors),
            _ => validate_auth(doc, &mut errors),
        };
        let allow_plaintext_auth = doc.allow_plaintext_auth.unwrap_or(false);
        let sends_secret = auth.as_ref().is_some_and(|a| *a != Auth::None);
        // A Graph endpoint in plain http is a loopback test double (EndpointUrl allows no other).
        if graph.is_none() && security == Some(Security::None) && sends_secret && !allow_plaintext_auth {
            errors.push(
                "auth",
                "security 'none' would send the password unencrypted; use security starttls or tls, \
                 or set allow_plaintext_auth = true if you accept that risk",
            );
        }
        let helo_name = doc.helo_name.as_deref().and_then(|v| errors.take(validate_host("helo_name", v)));
        let tls_server_name =
            doc.tls_server_name.as_deref().and_then(|v| errors.take(validate_host("tls_server_name", v)));
        let ca_file = doc
            .ca_file
            .as_deref()
            .and_then(|v| errors.take(check_header_safe("ca_file", v).map(|_| PathBuf::from(v.trim()))));
        let pin_sha256 = doc.pin_sha256.as_deref().and_then(|v| errors.take(parse_pin(v)));
        if let (Some(Security::None), true, None) =
            (security, pin_sha256.is_some() || ca_file.is_some() || tls_server_name.is_some(), &graph)
        {
            errors.push(
                "security",
                "'none' never uses TLS, so ca_file, pin_sha256 and tls_server_name would be ignored; \
                 use starttls or tls, or clear them with ''",
            );
        }
        let policy = fallback_recipient.as_ref().and_then(|f| recipient_policy(doc, f, &mut errors));
        let bounce_domain = doc.bounce_domain.as_deref().and_then(|v| match validate_host("bounce_domain", v) {
            Ok(d) if d.contains('.') && d.parse::<IpAddr>().is_err() => {
                Some(d.trim_end_matches('.').to_ascii_lowercase())
            }
            Ok(_) => {
                errors.push("bounce_domain", format!("'{v}' is not a domain name (e.g. bounces.example.org)"));
                None
            }
            Err(e) => {
                errors.0.push(e);
                None
            }
        });
        let connect_timeout = timeout(&mut errors, "connect_timeout", doc.connect_timeout.as_deref());
        let command_timeout = timeout(&mut errors, "command_timeout", doc.command_timeout.as_deref());
        let data_timeout = timeout(&mut errors, "data_timeout", doc.data_timeout.as_deref());
        let retry = errors.take(RetryPolicy::from_doc(doc.retry_schedule.as_deref(), doc.give_up_after.as_deref()));
        let mut limit = |field: &str, value: Option<i64>, max: i64| match value {
            None | Some(0) => None,
            Some(n) if (1..=max).contains(&n) => Some(n as u32),
            Some(n) => {
                errors.push(field, format!("{n} is not 1-{max}; 0 is no limit"));
                None
            }
        };
        let limits = SendLimits {
            messages_per_minute: limit("messages_per_minute", doc.messages_per_minute, 100_000),
            recipients_per_day: limit("recipients_per_day", doc.recipients_per_day, 10_000_000),
        };
        let recipients_per_transaction = match doc.recipients_per_transaction {
            None => 100,
            Some(n @ 1..=1000) => n as usize,
            Some(n) => {
                errors.push(
                    "recipients_per_transaction",
                    format!("{n} is not 1-1000; 100 is what every relay must take (RFC 5321 4.5.3.1.8)"),
                );
                100
            }
        };

        let timeouts = connect_timeout.zip(command_timeout).zip(data_timeout);
        match (transport, host, port, security, auth, from, fallback_recipient.zip(policy), timeouts, retry) {
            (
                Some(transport),
                Some(host),
                Some(port),
                Some(security),
                Some(auth),
                Some(from),
                Some((fallback_recipient, policy)),
                Some(((connect_timeout, command_timeout), data_timeout)),
                Some(retry),
            ) if errors.is_empty() => {
                let mut settings = RelaySettings {
                    credential_attached: false,
                    transport,
                    graph,
                    host,
                    port,
                    security,
                    auth,
                    from,
                    fallback_recipient,
                    helo_name,
                    ca_file,
                    pin_sha256,
                    tls_server_name,
                    allow_plaintext_auth,
                    allow_from_override: doc.allow_from_override.unwrap_or(false),
                    bounce_domain,
                    policy,
                    connect_timeout,
                    command_timeout,
                    data_timeout,
                    recipients_per_transaction,
                    limits,
                    retry,
                    standby: Vec::new(),
                    doc: doc.clone(),
                };
                // The binding is computed from the validated settings, token endpoint included.
                settings.credential_attached = settings.bound_to(doc.credential_relay.as_deref());
                Ok(settings)
            }
            _ => Err(errors),
        }
    }
}

/// The recipient policy: its mode, where redirect sends (the Fallback recipient unless set),
/// and the allowed domains, which must take the Fallback recipient and the redirect address
/// (else the Test Message, or every redirected message, would be refused).
fn recipient_policy(
    doc: &SettingsDoc,
    fallback: &EmailAddress,
    errors: &mut FieldErrors,
) -> Option<crate::policy::RecipientPolicy> {
    use crate::policy::{PolicyMode, RecipientPolicy};
    let mode = match doc.recipient_policy.as_deref() {
        None => Some(PolicyMode::Deliver),
        Some(v) => errors.take(PolicyMode::parse(v).ok_or_else(|| {
            FieldError::new(
                "recipient_policy",
                format!("'{v}' is not a recipient policy; use deliver, redirect or capture"),
            )
        })),
    }?;
    let redirect_to = match doc.redirect_to.as_deref() {
        Some(_) if mode != PolicyMode::Redirect => {
            errors.push(
                "redirect_to",
                "applies with recipient_policy redirect only; clear it with '' or set --recipient-policy redirect",
            );
            None
        }
        Some(v) => errors.take(EmailAddress::parse("redirect_to", v)),
        None => Some(fallback.clone()),
    }?;
    let mut allowed_domains = Vec::new();
    for d in doc.allowed_domains.as_deref().unwrap_or_default().split([',', ' ']).filter(|d| !d.is_empty()) {
        match validate_host("allowed_domains", d) {
            Ok(d) if d.contains('.') && d.parse::<IpAddr>().is_err() => {
                allowed_domains.push(d.trim_end_matches('.').to_ascii_lowercase())
            }
            _ => errors.push("allowed_domains", format!("'{d}' is not a domain name (e.g. test.example.org)")),
        }
    }
    let policy = RecipientPolicy { mode, redirect_to, allowed_domains };
    if !policy.allows(fallback.as_str()) {
        errors.push(
            "allowed_domains",
            format!("must take the Fallback recipient {fallback} (it gets the Test Message); add its domain"),
        );
    }
    if mode == PolicyMode::Redirect && !policy.allows(policy.redirect_to.as_str()) {
        errors.push("redirect_to", format!("{} is outside the allowed domains; add its domain", policy.redirect_to));
    }
    Some(policy)
}

/// The relay's host, security and port (`transport = smtp`).
fn smtp_endpoint(doc: &SettingsDoc, errors: &mut FieldErrors) -> (Option<String>, Option<Security>, Option<u16>) {
    let host = match doc.host.as_deref() {
        None => {
            errors.push("host", "is required; give the relay's DNS name or IP address (--host)");
            None
        }
        Some(h) => errors.take(validate_host("host", h)),
    };
    let security = match doc.security.as_deref() {
        None => Some(Security::Starttls),
        Some(v) => errors.take(Security::parse(v).ok_or_else(|| {
            FieldError::new(
                "security",
                format!("'{v}' is not a security mode; use one of tls, starttls, opportunistic, none"),
            )
        })),
    };
    let port = match doc.port {
        None => security.map(Security::default_port),
        Some(p) => errors.take(u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
            FieldError::new("port", format!("{p} is out of range; use 1-65535 (typically 25, 465 or 587)"))
        })),
    };
    (host, security, port)
}

/// `transport = graph`: the endpoint, and no setting of the SMTP relay left set (it would be
/// silently ignored, and the admin would think it applies).
fn graph_settings(doc: &SettingsDoc, errors: &mut FieldErrors) -> Option<GraphSettings> {
    for s in table::SETTINGS.iter().filter(|s| !s.uses.transport_uses(Transport::Graph)) {
        if doc.get(s.name).is_some() {
            errors.push(
                s.name,
                "belongs to the SMTP relay, which transport graph does not use; to send through a relay name \
                 --transport smtp too, or clear it with ''",
            );
        }
    }
    let endpoint = doc.graph_endpoint.as_deref().unwrap_or(GRAPH_ENDPOINT);
    let endpoint = errors
        .take(EndpointUrl::parse_as(endpoint, "Graph endpoint").map_err(|e| FieldError::new("graph_endpoint", e)))?;
    Some(GraphSettings { endpoint })
}

/// `transport = graph` signs in with OAuth2 as an Entra app: Microsoft, the mailbox to send as,
/// and the stored client secret.
fn graph_auth(doc: &SettingsDoc, errors: &mut FieldErrors) -> Option<Auth> {
    let provider = doc.oauth_provider.as_deref().unwrap_or("microsoft");
    if OAuthProvider::parse(provider) != Some(OAuthProvider::Microsoft) {
        errors.push(
            "oauth_provider",
            format!("'{provider}' cannot sign in to Microsoft Graph; use microsoft (or clear it with '')"),
        );
        return None;
    }
    if doc.username.is_none() {
        errors.push("username", "is required with transport graph: the mailbox Panel sends as (--username)");
    }
    if doc.credential.is_none() {
        errors.push(
            "credential",
            "is required with transport graph: the stored Microsoft credential of the Entra app (--credential)",
        );
    }
    if doc.username.is_none() || doc.credential.is_none() {
        return None;
    }
    oauth2(&SettingsDoc { oauth_provider: Some("microsoft".into()), ..doc.clone() }, false, errors)
}

fn validate_auth(doc: &SettingsDoc, errors: &mut FieldErrors) -> Option<Auth> {
    let has_password_source = doc.password_file.is_some() || doc.password_env.is_some();
    let oauth_only = |errors: &mut FieldErrors| {
        for (field, set) in
            [("oauth_provider", doc.oauth_provider.is_some()), ("token_endpoint", doc.token_endpoint.is_some())]
        {
            if set {
                errors.push(field, "applies only to auth = oauth2; clear it with ''");
            }
        }
    };
    let kerberos_set = doc.keytab.is_some() || doc.principal.is_some() || doc.service_principal.is_some();
    let kerberos_only = |errors: &mut FieldErrors| {
        for (field, set) in [
            ("keytab", doc.keytab.is_some()),
            ("principal", doc.principal.is_some()),
            ("service_principal", doc.service_principal.is_some()),
        ] {
            if set {
                errors.push(field, "applies only to auth = integrated; clear it with ''");
            }
        }
    };
    let anything_set = has_password_source
        || doc.username.is_some()
        || doc.credential.is_some()
        || doc.oauth_provider.is_some()
        || doc.token_endpoint.is_some()
        || kerberos_set;
    match doc.auth.as_deref().map(|a| a.trim().to_ascii_lowercase()) {
        None if !anything_set => Some(Auth::None),
        None => {
            errors.push("auth", "is not set but credentials are; add --auth password or --auth oauth2");
            None
        }
        Some(a) if a == "none" => {
            if anything_set {
                errors.push(
                    "auth",
                    "is 'none' but a username, credential or password source is set; use --auth password, or clear them with ''",
                );
            }
            Some(Auth::None)
        }
        Some(a) if a == "password" => {
            oauth_only(errors);
            kerberos_only(errors);
            match doc.credential.as_deref() {
                Some(name) => stored_password(doc, name, has_password_source, errors),
                None => external_password(doc, errors),
            }
        }
        Some(a) if a == "oauth2" => {
            kerberos_only(errors);
            oauth2(doc, has_password_source, errors)
        }
        Some(a) if a == "integrated" => {
            oauth_only(errors);
            integrated(doc, has_password_source, errors)
        }
        Some(a) if a == "ntlm" => {
            oauth_only(errors);
            kerberos_only(errors);
            if has_password_source || doc.username.is_some() {
                errors.push(
                    "credential",
                    "auth = ntlm takes its username (DOMAIN\\user) and password from a stored credential; clear --username and password sources",
                );
            }
            match doc.credential.as_deref() {
                None => {
                    errors.push(
                        "credential",
                        "is required with auth = ntlm: a stored password credential (--credential)",
                    );
                    None
                }
                Some(c) => {
                    errors.take(credential::validate_name("credential", c)).map(|credential| Auth::Ntlm { credential })
                }
            }
        }
        Some(other) => {
            errors.push(
                "auth",
                format!("'{other}' is not an authentication mode; use none, password, oauth2, integrated or ntlm"),
            );
            None
        }
    }
}

fn stored_password(doc: &SettingsDoc, name: &str, has_source: bool, errors: &mut FieldErrors) -> Option<Auth> {
    if has_source {
        errors.push("credential", "and a password file or variable are both set; keep one (clear the other with '')");
    }
    if doc.username.is_some() {
        errors.push("username", format!("comes from the stored credential '{name}'; clear it with --username ''"));
    }
    let credential = errors.take(credential::validate_name("credential", name))?;
    Some(Auth::Stored { credential })
}

fn external_password(doc: &SettingsDoc, errors: &mut FieldErrors) -> Option<Auth> {
    let username = match doc.username.as_deref() {
        None => {
            errors.push("username", "is required with a password file or variable (--username)");
            None
        }
        Some(u) => errors.take(check_header_safe("username", u).map(|_| u.to_string())),
    };
    let source = match (doc.password_file.as_deref(), doc.password_env.as_deref()) {
        (Some(f), None) => {
            errors.take(check_header_safe("password_file", f).map(|_| PasswordSource::File(PathBuf::from(f))))
        }
        (None, Some(v)) => errors.take(validate_env_name(v).map(|_| PasswordSource::Env(v.to_string()))),
        (Some(_), Some(_)) => {
            errors.push("password_file", "and password_env are both set; keep one (clear the other with '')");
            None
        }
        (None, None) => {
            errors.push(
                "credential",
                "auth = password needs a stored credential (--credential NAME) or a password source \
                 (--password-file FILE or --password-env VARIABLE)",
            );
            None
        }
    };
    Some(Auth::Password { username: username?, source: source? })
}

fn oauth2(doc: &SettingsDoc, has_source: bool, errors: &mut FieldErrors) -> Option<Auth> {
    if has_source {
        errors
            .push("password_file", "does not apply to auth = oauth2; the secret is a stored credential (--credential)");
    }
    let provider = match doc.oauth_provider.as_deref() {
        None => {
            errors.push("oauth_provider", "is required with auth = oauth2: microsoft or google (--oauth-provider)");
            None
        }
        Some(p) => errors.take(OAuthProvider::parse(p).ok_or_else(|| {
            FieldError::new("oauth_provider", format!("'{p}' is not a provider; use microsoft or google"))
        })),
    };
    let mailbox = match doc.username.as_deref() {
        None => {
            errors.push("username", "is required with auth = oauth2: the mailbox Panel sends as (--username)");
            None
        }
        Some(u) => errors.take(EmailAddress::parse("username", u)),
    };
    let credential = match doc.credential.as_deref() {
        None => {
            errors.push(
                "credential",
                "is required with auth = oauth2: the stored client secret or service account key (--credential)",
            );
            None
        }
        Some(c) => errors.take(credential::validate_name("credential", c)),
    };
    let token_endpoint = match doc.token_endpoint.as_deref() {
        None => Some(None),
        Some(u) => errors.take(EndpointUrl::parse(u).map(Some).map_err(|e| FieldError::new("token_endpoint", e))),
    };
    Some(Auth::OAuth2 {
        provider: provider?,
        mailbox: mailbox?,
        credential: credential?,
        token_endpoint: token_endpoint?,
    })
}

fn integrated(doc: &SettingsDoc, has_source: bool, errors: &mut FieldErrors) -> Option<Auth> {
    if has_source || doc.username.is_some() || doc.credential.is_some() {
        errors.push(
            "auth",
            "integrated uses the service's own Kerberos identity; clear --username, --credential and password sources",
        );
    }
    let principal_ok = |field: &str, v: &str| -> Result<String, FieldError> {
        check_header_safe(field, v)?;
        let v = v.trim();
        if v.is_empty() || v.contains(char::is_whitespace) {
            return Err(FieldError::new(
                field,
                format!("'{v}' is not a Kerberos principal (e.g. panel/host.example.org@EXAMPLE.ORG)"),
            ));
        }
        Ok(v.to_string())
    };
    let keytab = doc
        .keytab
        .as_deref()
        .and_then(|v| errors.take(check_header_safe("keytab", v).map(|_| PathBuf::from(v.trim()))));
    let principal = doc.principal.as_deref().and_then(|v| errors.take(principal_ok("principal", v)));
    let service_principal =
        doc.service_principal.as_deref().and_then(|v| errors.take(principal_ok("service_principal", v)));
    if keytab.is_some() && principal.is_none() && doc.principal.is_none() {
        errors.push("principal", "is required with a keytab: the service's principal in it (--principal)");
    }
    if keytab.is_none() && doc.principal.is_some() {
        errors.push("keytab", "is required with a principal; without both, the default credential cache is used");
    }
    Some(Auth::Integrated { keytab, principal, service_principal })
}

fn validate_env_name(v: &str) -> Result<(), FieldError> {
    let ok = !v.is_empty()
        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !v.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(FieldError::new("password_env", format!("'{v}' is not an environment variable name (letters, digits, _)")))
    }
}

/// A timeout, or the table's default for it.
fn timeout(errors: &mut FieldErrors, field: &str, value: Option<&str>) -> Option<Duration> {
    let default = table::setting(field).map(|s| s.default.text()).unwrap_or_default();
    let Some(v) = value else { return errors.take(duration::parse(default).map_err(|e| FieldError::new(field, e))) };
    let parsed = duration::parse(v).map_err(|e| FieldError::new(field, e));
    let checked = parsed.and_then(|d| {
        if d < Duration::from_secs(1) || d > Duration::from_secs(600) {
            Err(FieldError::new(field, format!("'{v}' is out of range; use 1s to 10m")))
        } else {
            Ok(d)
        }
    });
    errors.take(checked)
}

/// Accepts a DNS name, an IPv4 address or an IPv6 address (bare or in brackets).
pub fn validate_host(field: &str, value: &str) -> Result<String, FieldError> {
    check_header_safe(field, value)?;
    let v = value.trim();
    let unbracketed = v.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(v);
    if unbracketed.parse::<IpAddr>().is_ok() {
        return Ok(unbracketed.to_string());
    }
    let name = v.strip_suffix('.').unwrap_or(v);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if valid {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(FieldError::new(field, format!("'{v}' is not a valid host name or IP address")))
    }
}

/// A SHA-256 certificate fingerprint, as `openssl x509 -fingerprint -sha256` prints it or as plain hex.
pub fn parse_pin(value: &str) -> Result<[u8; 32], FieldError> {
    let hexits: String = value.trim().trim_start_matches("sha256:").chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&hexits, &mut out).map_err(|_| {
        FieldError::new(
            "pin_sha256",
            "is not a SHA-256 fingerprint; give 64 hex digits (colons allowed), as `panel smtp check` or \
             `openssl x509 -noout -fingerprint -sha256` prints it",
        )
    })?;
    Ok(out)
}

pub fn format_pin(pin: &[u8; 32]) -> String {
    hex::encode(pin)
}

/// The smallest valid settings, for the tests of the settings modules.
#[cfg(test)]
pub(crate) fn example_doc() -> SettingsDoc {
    SettingsDoc {
        host: Some("relay.example.org".into()),
        from: Some("Identity Panel <panel@example.org>".into()),
        fallback_recipient: Some("ops@example.org".into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> SettingsDoc {
        example_doc()
    }

    fn fields(err: FieldErrors) -> Vec<String> {
        err.0.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn minimal_settings_get_secure_defaults() {
        let s = RelaySettings::validate(&base()).unwrap();
        assert_eq!(s.security, Security::Starttls);
        assert_eq!(s.port, 587);
        assert_eq!(s.auth, Auth::None);
        assert_eq!((s.connect_timeout, s.command_timeout), (Duration::from_secs(10), Duration::from_secs(30)));
        assert!(!s.allow_plaintext_auth);
    }

    #[test]
    fn port_derives_from_security_mode() {
        for (mode, port) in [("tls", 465), ("starttls", 587), ("opportunistic", 25), ("none", 25)] {
            let doc = SettingsDoc { security: Some(mode.into()), ..base() };
            assert_eq!(RelaySettings::validate(&doc).unwrap().port, port, "{mode}");
        }
        let doc = SettingsDoc { security: Some("tls".into()), port: Some(2465), ..base() };
        assert_eq!(RelaySettings::validate(&doc).unwrap().port, 2465);
    }

    #[test]
    fn reports_every_problem_at_once() {
        let doc = SettingsDoc {
            host: Some("bad host".into()),
            port: Some(70000),
            security: Some("ssl".into()),
            from: Some("not an address".into()),
            fallback_recipient: None,
            connect_timeout: Some("0".into()),
            ..Default::default()
        };
        let f = fields(RelaySettings::validate(&doc).unwrap_err());
        for expected in ["host", "security", "port", "from", "fallback_recipient", "connect_timeout"] {
            assert!(f.contains(&expected.to_string()), "{expected} missing in {f:?}");
        }
    }

    #[test]
    fn port_out_of_range_names_the_field_and_the_fix() {
        for p in [0, -1, 65536] {
            let err = RelaySettings::validate(&SettingsDoc { port: Some(p), ..base() }).unwrap_err();
            assert_eq!(err.0[0].field, "port");
            assert!(err.0[0].message.contains("1-65535"));
        }
    }

    #[test]
    fn the_files_read_outside_panel_are_the_password_file_keytab_and_ca_file() {
        let with = |doc: SettingsDoc| {
            let s = RelaySettings::validate(&doc).unwrap();
            s.outside_files().iter().map(|p| p.display().to_string()).collect::<Vec<_>>()
        };
        assert!(with(base()).is_empty());
        let password = SettingsDoc {
            auth: Some("password".into()),
            username: Some("panel".into()),
            password_file: Some("/etc/panel/pw".into()),
            ca_file: Some("/etc/panel/ca.pem".into()),
            ..base()
        };
        assert_eq!(with(password.clone()), ["/etc/panel/pw", "/etc/panel/ca.pem"]);
        let env = SettingsDoc { password_file: None, password_env: Some("PW".into()), ca_file: None, ..password };
        assert!(with(env).is_empty(), "an environment variable is no file");
        let kerberos = SettingsDoc {
            auth: Some("integrated".into()),
            keytab: Some("/etc/panel/panel.keytab".into()),
            principal: Some("panel@PANEL.TEST".into()),
            ..base()
        };
        assert_eq!(with(kerberos), ["/etc/panel/panel.keytab"]);
    }

    #[test]
    fn password_auth_needs_username_and_exactly_one_source() {
        let doc = SettingsDoc { auth: Some("password".into()), ..base() };
        let f = fields(RelaySettings::validate(&doc).unwrap_err());
        assert_eq!(f, ["username", "credential"]);

        let doc = SettingsDoc {
            auth: Some("password".into()),
            username: Some("panel".into()),
            password_file: Some("/etc/panel/pw".into()),
            password_env: Some("PW".into()),
            ..base()
        };
        assert_eq!(fields(RelaySettings::validate(&doc).unwrap_err()), ["password_file"]);

        let doc = SettingsDoc { password_file: None, ..doc };
        let s = RelaySettings::validate(&doc).unwrap();
        assert_eq!(s.auth, Auth::Password { username: "panel".into(), source: PasswordSource::Env("PW".into()) });
    }

    #[test]
    fn integrated_auth_uses_a_keytab_or_the_default_cache() {
        let doc = SettingsDoc { auth: Some("integrated".into()), ..base() };
        let s = RelaySettings::validate(&doc).unwrap();
        assert_eq!(s.auth, Auth::Integrated { keytab: None, principal: None, service_principal: None });
        assert_eq!(s.auth.credential(), None, "no secret stored, so no license needed");
        let doc = SettingsDoc {
            keytab: Some("/etc/panel/panel.keytab".into()),
            principal: Some("panel/host.example.org@EXAMPLE.ORG".into()),
            service_principal: Some("smtp/relay.example.org".into()),
            ..doc
        };
        let Auth::Integrated { keytab, principal, service_principal } = RelaySettings::validate(&doc).unwrap().auth
        else {
            panic!()
        };
        assert_eq!(keytab.unwrap().to_str(), Some("/etc/panel/panel.keytab"));
        assert_eq!(principal.as_deref(), Some("panel/host.example.org@EXAMPLE.ORG"));
        assert_eq!(service_principal.as_deref(), Some("smtp/relay.example.org"));
        let bad = SettingsDoc { principal: None, username: Some("x".into()), ..doc.clone() };
        assert_eq!(fields(RelaySettings::validate(&bad).unwrap_err()), ["auth", "principal"]);
        let other = SettingsDoc { auth: Some("password".into()), credential: Some("relay".into()), ..doc };
        assert_eq!(fields(RelaySettings::validate(&other).unwrap_err()), ["keytab", "principal", "service_principal"]);
    }

    #[test]
    fn ntlm_needs_a_stored_credential() {
        let doc = SettingsDoc { auth: Some("ntlm".into()), credential: Some("exchange".into()), ..base() };
        let s = RelaySettings::validate(&doc).unwrap();
        assert_eq!(s.auth, Auth::Ntlm { credential: "exchange".into() });
        assert_eq!(s.auth.credential(), Some("exchange"), "license-gated like any stored credential");
        let doc = SettingsDoc { credential: None, ..doc };
        assert_eq!(fields(RelaySettings::validate(&doc).unwrap_err()), ["credential"]);
    }

    #[test]
    fn stored_credentials_take_the_username_from_the_store() {
        let doc = SettingsDoc { auth: Some("password".into()), credential: Some("relay".into()), ..base() };
        let s = RelaySettings::validate(&doc).unwrap();
        assert_eq!(s.auth, Auth::Stored { credential: "relay".into() });
        let doc = SettingsDoc { username: Some("panel".into()), password_env: Some("PW".into()), ..doc };
        assert_eq!(fields(RelaySettings::validate(&doc).unwrap_err()), ["credential", "username"]);
    }

    #[test]
    fn a_credential_is_attached_only_to_the_endpoint_it_was_confirmed_for() {
        let doc = SettingsDoc { auth: Some("password".into()), credential: Some("relay".into()), ..base() };
        assert!(!RelaySettings::validate(&doc).unwrap().credential_attached);
        let bound = SettingsDoc { credential_relay: Some("relay.example.org:587/starttls".into()), ..doc.clone() };
        let s = RelaySettings::validate(&bound).unwrap();
        assert!(s.credential_attached);
        assert_eq!(s.endpoint(), "relay.example.org:587/starttls");
        let moved = SettingsDoc { host: Some("evil.example.net".into()), ..bound.clone() };
        assert!(!RelaySettings::validate(&moved).unwrap().credential_attached);
        let tls = SettingsDoc { security: Some("tls".into()), ..bound };
        assert!(!RelaySettings::validate(&tls).unwrap().credential_attached);
        // A patch cannot forge the binding.
        let patch =
            SettingsDoc { credential_relay: Some("evil.example.net:587/starttls".into()), ..Default::default() };
        assert_eq!(doc.merged(&patch).credential_relay, None);
    }

    #[test]
    fn oauth2_needs_provider_mailbox_and_credential() {
        let doc = SettingsDoc { auth: Some("oauth2".into()), ..base() };
        assert_eq!(fields(RelaySettings::validate(&doc).unwrap_err()), ["oauth_provider", "username", "credential"]);
        let doc = SettingsDoc {
            oauth_provider: Some("microsoft".into()),
            username: Some("panel@contoso.com".into()),
            credential: Some("m365".into()),
            token_endpoint: Some("http://127.0.0.1:9000/token".into()),
            ..doc
        };
        let s = RelaySettings::validate(&doc).unwrap();
        let Auth::OAuth2 { provider, mailbox, token_endpoint, .. } = &s.auth else { panic!("{:?}", s.auth) };
        assert_eq!((*provider, mailbox.as_str()), (OAuthProvider::Microsoft, "panel@contoso.com"));
        assert_eq!(token_endpoint.as_ref().unwrap().port, 9000);
        let bad = SettingsDoc { token_endpoint: Some("http://idp.example.org/token".into()), ..doc.clone() };
        assert_eq!(fields(RelaySettings::validate(&bad).unwrap_err()), ["token_endpoint"]);
        let stray = SettingsDoc { auth: Some("password".into()), username: None, ..doc };
        assert_eq!(fields(RelaySettings::validate(&stray).unwrap_err()), ["oauth_provider", "token_endpoint"]);
    }

    #[test]
    fn plaintext_password_is_refused_unless_explicitly_allowed() {
        let doc = SettingsDoc {
            security: Some("none".into()),
            auth: Some("password".into()),
            username: Some("panel".into()),
            password_env: Some("PW".into()),
            ..base()
        };
        let err = RelaySettings::validate(&doc).unwrap_err();
        assert!(err.0[0].message.contains("unencrypted"));
        let doc = SettingsDoc { allow_plaintext_auth: Some(true), ..doc };
        assert!(RelaySettings::validate(&doc).is_ok());
    }

    #[test]
    fn header_injection_in_settings_is_rejected() {
        let doc = SettingsDoc { from: Some("a@b.org\r\nBcc: victim@x.org".into()), ..base() };
        assert_eq!(fields(RelaySettings::validate(&doc).unwrap_err()), ["from"]);
        let doc = SettingsDoc { helo_name: Some("host\r\nRCPT TO:<x@y>".into()), ..base() };
        assert_eq!(fields(RelaySettings::validate(&doc).unwrap_err()), ["helo_name"]);
    }

    #[test]
    fn pins_accept_openssl_format() {
        let colons = "AB:".repeat(31) + "AB";
        assert_eq!(parse_pin(&colons).unwrap(), [0xab; 32]);
        assert_eq!(parse_pin(&"ab".repeat(32)).unwrap(), [0xab; 32]);
        assert!(parse_pin("abcd").is_err());
    }

    #[test]
    fn merge_keeps_unnamed_fields_and_clears_empty_ones() {
        let stored = SettingsDoc { ca_file: Some("/ca.pem".into()), port: Some(2525), ..base() };
        let patch =
            SettingsDoc { host: Some("other.example.org".into()), ca_file: Some(String::new()), ..Default::default() };
        let merged = stored.merged(&patch);
        assert_eq!(merged.host.as_deref(), Some("other.example.org"));
        assert_eq!(merged.port, Some(2525));
        assert_eq!(merged.ca_file, None);
        assert_eq!(merged.from, stored.from);
    }

    #[test]
    fn hosts_accept_names_and_ip_literals() {
        assert_eq!(validate_host("host", "Relay.Example.org.").unwrap(), "relay.example.org");
        assert_eq!(validate_host("host", "127.0.0.1").unwrap(), "127.0.0.1");
        assert_eq!(validate_host("host", "[::1]").unwrap(), "::1");
        assert!(validate_host("host", "-bad.example").is_err());
        assert!(validate_host("host", "").is_err());
    }
}
