//! Microsoft Graph's sendMail (`transport = graph`): the message Panel builds, as MIME, posted
//! to `/v1.0/users/{mailbox}/sendMail` with an app-only token (the `Mail.Send` application
//! permission). Graph answers 202 when Exchange Online took the message for delivery; its
//! refusals are HTTP statuses with an error code, recorded with the `request-id` and
//! `client-request-id` that Microsoft support asks for.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hyper::body::Bytes;
use panel_domain::delivery::{RecipientResult, SendReport};
use panel_domain::{EndpointUrl, Failure, FailureKind, RelaySettings, Secret, SmtpReply, Stage};
use serde::Deserialize;

use crate::auth::{AuthSecret, CredentialSource};
use crate::check::{CheckFailure, CheckReport};
use crate::connection::Transcript;
use crate::http::{self, HttpError, HttpResponse};
use crate::tls::TlsTrust;

/// The application permission an app needs to send as a mailbox.
pub const MAIL_SEND: &str = "Mail.Send";

/// The longest `Retry-After` taken as asked; a larger one (or a date) waits this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Graph sendMail prepared for the settings in force.
pub struct Graph {
    settings: Arc<RelaySettings>,
    endpoint: EndpointUrl,
    trust: TlsTrust,
    credentials: Arc<dyn CredentialSource>,
}

impl Graph {
    pub fn new(settings: Arc<RelaySettings>, credentials: Option<Arc<dyn CredentialSource>>) -> Result<Graph, Failure> {
        let config = |detail: &str| Failure::new(Stage::Config, FailureKind::Credential, detail);
        let endpoint =
            settings.graph.as_ref().map(|g| g.endpoint.clone()).ok_or_else(|| config("not a Graph transport"))?;
        let credentials = credentials.ok_or_else(|| config("transport graph needs a stored Microsoft credential"))?;
        // The system roots, plus the settings' CA file (a TLS-inspecting proxy, a test double).
        let trust = TlsTrust::load(settings.ca_file.as_deref(), None)?;
        Ok(Graph { settings, endpoint, trust, credentials })
    }

    /// The endpoint, as logs and attempts name it.
    pub fn address(&self) -> String {
        self.endpoint.to_string()
    }

    /// Sends `mime` (every recipient in its headers, Bcc included: Graph takes them from there
    /// and removes Bcc from what recipients see) as the settings' mailbox.
    pub async fn send(&self, mime: &[u8], recipients: usize) -> SendReport {
        let mut t = Transcript::default();
        match self.submit(mime, &mut t).await {
            Ok(reply) => SendReport {
                recipients: vec![RecipientResult::Accepted; recipients],
                failure: None,
                data_reply: Some(reply),
            },
            Err(f) => SendReport {
                recipients: vec![RecipientResult::NotTried; recipients],
                failure: Some(f),
                data_reply: None,
            },
        }
    }

    async fn submit(&self, mime: &[u8], t: &mut Transcript) -> Result<SmtpReply, Failure> {
        let body = Bytes::from(STANDARD.encode(mime));
        let token = self.token(false, t).await?;
        let mut answer = self.send_mail(&token, body.clone()).await?;
        if answer.status == 401 {
            // A cached token may have been revoked or expired early: one fresh one, once.
            let token = self.token(true, t).await?;
            answer = self.send_mail(&token, body).await?;
        }
        if answer.status == 202 {
            return Ok(SmtpReply {
                code: 202,
                enhanced: None,
                text: format!("Accepted: Exchange Online took the message for delivery ({})", ids(&answer)),
            });
        }
        Err(refusal(&answer))
    }

    /// A token for Graph (`Mail.Send`), from the credential source's cache unless `refresh`.
    async fn token(&self, refresh: bool, t: &mut Transcript) -> Result<Secret, Failure> {
        let resolved = self.credentials.resolve(refresh).await.inspect_err(|f| t.failed(f))?;
        let AuthSecret::XOAuth2 { token, .. } = resolved.secret else {
            return Err(Failure::new(Stage::Token, FailureKind::Credential, "the credential gave no OAuth2 token"));
        };
        t.ok(Stage::Token, resolved.token_note.unwrap_or_else(|| "token".into()), None);
        Ok(token)
    }

    async fn send_mail(&self, token: &Secret, body: Bytes) -> Result<HttpResponse, Failure> {
        let mailbox = match &self.settings.auth {
            panel_domain::Auth::OAuth2 { mailbox, .. } => mailbox.to_string(),
            _ => {
                return Err(Failure::new(
                    Stage::Config,
                    FailureKind::Credential,
                    "transport graph signs in with OAuth2",
                ));
            }
        };
        let base = self.endpoint.path.trim_end_matches('/');
        let url = EndpointUrl {
            path: format!("{base}/v1.0/users/{}/sendMail", path_segment(&mailbox)),
            ..self.endpoint.clone()
        };
        let mut bearer = hyper::header::HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
            Failure::new(Stage::Token, FailureKind::TokenRejected, "the token is not a valid header value")
        })?;
        bearer.set_sensitive(true);
        let request = http::request(&url, "POST", "text/plain")
            .header(hyper::header::AUTHORIZATION, bearer)
            .header("client-request-id", client_request_id())
            .header("return-client-request-id", "true")
            .body(body)
            .map_err(|e| {
                Failure::new(Stage::Internal, FailureKind::Internal, format!("building the Graph request: {e}"))
            })?;
        // The whole message goes in one request: the end-of-message wait applies, as on SMTP.
        let limit = self.settings.command_timeout.max(self.settings.data_timeout);
        http::send(&url, request, &self.trust, self.settings.connect_timeout, limit).await.map_err(failure)
    }
}

/// Graph could not be reached (DNS, TCP, TLS): retried like an unreachable relay, and the
/// transport backs off as a whole. The request went but no answer came: Graph may have taken
/// the message, so the retry may deliver a second copy (recorded as such, like an SMTP relay's
/// silence after the end of the message).
fn failure(e: HttpError) -> Failure {
    match e {
        HttpError::NoAnswer(detail) => Failure::new(
            Stage::Graph,
            FailureKind::UnknownOutcome,
            format!("Microsoft Graph: {detail}; it may have accepted the message"),
        ),
        HttpError::NotSent(detail) => {
            let (stage, kind) = if detail.starts_with("TLS with") {
                (Stage::Tls, FailureKind::TlsHandshake)
            } else if detail.contains("no connection within") {
                (Stage::Tcp, FailureKind::Timeout)
            } else if detail.contains("onnection refused") {
                (Stage::Tcp, FailureKind::ConnectionRefused)
            } else {
                (Stage::Tcp, FailureKind::Io)
            };
            Failure::new(stage, kind, format!("Microsoft Graph: {detail}"))
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<GraphError>,
}

#[derive(Deserialize)]
struct GraphError {
    code: Option<String>,
    message: Option<String>,
}

/// Graph's refusal: the HTTP status as the reply's code, its error code and message as the
/// text (bounded, one line), the ids support asks for, and `Retry-After`.
fn refusal(answer: &HttpResponse) -> Failure {
    let error = serde_json::from_slice::<ErrorBody>(&answer.body).ok().and_then(|b| b.error);
    let clean = |s: &str| s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(500).collect::<String>();
    let said = match error {
        Some(GraphError { code, message }) => format!(
            "{}: {}",
            clean(code.as_deref().unwrap_or("error")),
            clean(message.as_deref().unwrap_or("no message"))
        ),
        None => format!("HTTP {} without a Graph error body", answer.status),
    };
    let reply = SmtpReply { code: answer.status, enhanced: None, text: format!("{said} ({})", ids(answer)) };
    let mut failure = Failure::reply(Stage::Graph, reply);
    failure.retry_after = retry_after(answer);
    failure
}

/// `Retry-After` in seconds, bounded; a date or a larger number waits the bound.
fn retry_after(answer: &HttpResponse) -> Option<Duration> {
    let value = answer.header("retry-after")?.trim();
    Some(match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs).min(MAX_RETRY_AFTER),
        Err(_) => MAX_RETRY_AFTER,
    })
}

/// The ids Microsoft support asks for.
fn ids(answer: &HttpResponse) -> String {
    let id =
        |name: &str| answer.header(name).map(|v| v.chars().filter(|c| !c.is_control()).take(80).collect::<String>());
    format!(
        "request-id {}, client-request-id {}",
        id("request-id").unwrap_or_else(|| "none".into()),
        id("client-request-id").unwrap_or_else(|| "none".into())
    )
}

/// A fresh id for `client-request-id` (a GUID, as Graph expects).
fn client_request_id() -> String {
    let b = crate::random_bytes::<16>();
    format!(
        "{}-{}-4{}-{:x}{}-{}",
        hex::encode(&b[0..4]),
        hex::encode(&b[4..6]),
        &hex::encode(&b[6..8])[1..],
        8 | (b[8] & 0x3),
        &hex::encode(&b[8..10])[1..],
        hex::encode(&b[10..16])
    )
}

/// The mailbox as one path segment: unreserved characters and `@` as they are, the rest
/// percent-encoded (an address's local part may hold `/`, `?`, `#` or `%`).
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What an access token says about itself, read (not verified: Graph verifies it) from its
/// JWT payload: the audience, the app's roles and the expiry.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TokenClaims {
    pub audience: Option<String>,
    pub roles: Vec<String>,
}

pub fn token_claims(token: &str) -> Option<TokenClaims> {
    let payload = token.split('.').nth(1)?;
    let json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?).ok()?;
    Some(TokenClaims {
        audience: json["aud"].as_str().map(String::from),
        roles: json["roles"]
            .as_array()
            .map(|r| r.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default(),
    })
}

/// `panel smtp check` for Graph: the token stage (endpoint, status, expiry, the app's roles and
/// whether `Mail.Send` is among them) and the mailbox stage, which Graph cannot prove without
/// sending: the Test Message does.
pub async fn check(settings: Arc<RelaySettings>, credentials: Option<Arc<dyn CredentialSource>>) -> CheckReport {
    let mut t = Transcript::default();
    let result = async {
        let graph = Graph::new(settings.clone(), credentials).inspect_err(|f| t.failed(f))?;
        let resolved = graph.credentials.resolve(true).await.inspect_err(|f| t.failed(f))?;
        let AuthSecret::XOAuth2 { token, .. } = resolved.secret else {
            let f = Failure::new(Stage::Token, FailureKind::Credential, "the credential gave no OAuth2 token");
            t.failed(&f);
            return Err(f);
        };
        let note = resolved.token_note.unwrap_or_default();
        let claims = token_claims(token.expose());
        let roles = match &claims {
            Some(c) if c.roles.is_empty() => "the token carries no application roles".to_string(),
            Some(c) => format!("the app's roles: {}", c.roles.join(", ")),
            None => "the token is not a JWT, so its roles cannot be read".to_string(),
        };
        // Not a failure: Exchange's RBAC for Applications (the recommended way to limit an app
        // to some mailboxes) grants Mail.Send outside the token, where no check can see it.
        let missing = match &claims {
            Some(c) if !c.roles.iter().any(|r| r == MAIL_SEND) => format!(
                "; {MAIL_SEND} is not among them: sending works only if Exchange's RBAC for Applications grants it \
                 (a role assignment of \"Application Mail.Send\"); otherwise grant the app the {MAIL_SEND} application \
                 permission with admin consent"
            ),
            _ => String::new(),
        };
        t.ok(Stage::Token, format!("{note}; {roles}{missing}"), None);
        t.ok(
            Stage::Graph,
            format!(
                "sending as {} through {} is not checked: Microsoft Graph has no call that proves an app may send as a \
                 mailbox without sending (reading the mailbox needs permissions a Mail.Send app should not have); the \
                 Test Message proves it (panel smtp test)",
                match &settings.auth {
                    panel_domain::Auth::OAuth2 { mailbox, .. } => mailbox.to_string(),
                    _ => String::new(),
                },
                graph.address()
            ),
            None,
        );
        Ok(())
    }
    .await;
    let failure = result.err().map(|f| CheckFailure::new(&f, &settings));
    CheckReport {
        ok: failure.is_none(),
        transport: "graph".into(),
        relay: settings.graph.as_ref().map(|g| g.endpoint.to_string()).unwrap_or_default(),
        security: "https".into(),
        stages: t.events,
        tls: None,
        extensions: Vec::new(),
        auth_mechanisms: Vec::new(),
        failure,
        released: 0,
        ran_in: String::new(),
        route: panel_domain::PRIMARY.to_string(),
        standby: Vec::new(),
        in_use: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mailbox_is_one_path_segment() {
        assert_eq!(path_segment("panel@contoso.com"), "panel@contoso.com");
        assert_eq!(path_segment("a/b?c#d%e@x.org"), "a%2Fb%3Fc%23d%25e@x.org");
    }

    #[test]
    fn roles_are_read_from_the_tokens_payload() {
        let payload =
            URL_SAFE_NO_PAD.encode(r#"{"aud":"https://graph.microsoft.com","roles":["Mail.Send","User.Read.All"]}"#);
        let claims = token_claims(&format!("eyJhbGciOiJSUzI1NiJ9.{payload}.sig")).unwrap();
        assert_eq!(claims.audience.as_deref(), Some("https://graph.microsoft.com"));
        assert_eq!(claims.roles, ["Mail.Send", "User.Read.All"]);
        assert_eq!(token_claims("opaque-token"), None);
    }

    #[test]
    fn no_answer_after_the_request_is_an_unknown_outcome_and_no_connection_is_retried() {
        let f = failure(HttpError::NoAnswer("https://graph.microsoft.com did not answer within 600s".into()));
        assert_eq!((f.stage, f.kind), (Stage::Graph, FailureKind::UnknownOutcome));
        let f = failure(HttpError::NotSent("cannot connect to https://graph.microsoft.com: Connection refused".into()));
        assert_eq!((f.stage, f.kind), (Stage::Tcp, FailureKind::ConnectionRefused));
        let f = failure(HttpError::NotSent("TLS with https://graph.microsoft.com failed: x".into()));
        assert_eq!(f.stage, Stage::Tls);
    }

    #[test]
    fn client_request_ids_are_guids() {
        let id = client_request_id();
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12], "{id}");
        assert!(parts[2].starts_with('4'), "version 4: {id}");
        assert_ne!(client_request_id(), id);
    }
}
