//! SMTP AUTH: where the secret comes from (a file, the environment, or Panel's credential store
//! through a `CredentialSource`) and the SASL exchanges (PLAIN, LOGIN, XOAUTH2). Secrets live in
//! zeroizing buffers and never enter a transcript, a failure or a log line.

use std::future::Future;
use std::pin::Pin;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use panel_domain::{Auth, Failure, FailureKind, PasswordSource, RelaySettings, Secret, SmtpReply, Stage};
use zeroize::Zeroizing;

use crate::connection::{Connection, Transcript};

/// What the relay is given to authenticate with.
#[derive(Debug, Clone)]
pub enum AuthSecret {
    Password {
        username: String,
        password: Secret,
    },
    /// An OAuth2 access token for `user`; `source` says where and when it was issued (for errors).
    XOAuth2 {
        user: String,
        token: Secret,
        source: String,
    },
}

/// A secret resolved by a `CredentialSource`, with what to show for the stage that produced it.
pub struct Resolved {
    pub secret: AuthSecret,
    /// For OAuth2: the token stage as it happened (endpoint, HTTP status, expiry).
    pub token_note: Option<String>,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Resolves stored credentials (and OAuth2 tokens) for the relay. Implemented by the service,
/// which owns the credential store, the license check and the token cache.
pub trait CredentialSource: Send + Sync {
    /// The secret to authenticate with. `refresh` asks for a new token after the relay rejected
    /// the cached one.
    fn resolve(&self, refresh: bool) -> BoxFuture<'_, Result<Resolved, Failure>>;

    /// Called once AUTH succeeded with a stored credential.
    fn used(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

fn local(detail: String) -> Failure {
    Failure::new(Stage::Config, FailureKind::LocalConfig, detail)
}

/// Reads a password kept outside Panel.
pub(crate) fn read_password(source: &PasswordSource) -> Result<Secret, Failure> {
    match source {
        PasswordSource::File(path) => std::fs::read_to_string(path)
            .map(|s| {
                let s = Zeroizing::new(s);
                Secret::new(s.trim_end_matches(['\r', '\n']).to_string())
            })
            .map_err(|e| local(format!("password file {} cannot be read: {e}", path.display()))),
        PasswordSource::Env(var) => std::env::var(var)
            .map(Secret::new)
            .map_err(|_| local(format!("environment variable {var} (the relay password) is not set in this process"))),
    }
}

/// AUTH with whatever `auth` calls for. `source` resolves stored credentials.
pub(crate) async fn authenticate(
    conn: &mut Connection,
    settings: &RelaySettings,
    source: Option<&dyn CredentialSource>,
    t: &mut Transcript,
) -> Result<(), Failure> {
    let auth = &settings.auth;
    if *auth == Auth::None {
        return Ok(());
    }
    if !conn.encrypted && !settings.allow_plaintext_auth {
        return Err(Failure::new(
            Stage::Auth,
            FailureKind::PlaintextAuthRefused,
            "refusing to send credentials over an unencrypted connection",
        ));
    }
    let mechanisms = conn.extensions.auth_mechanisms();
    if mechanisms.is_empty() {
        return Err(Failure::new(Stage::Auth, FailureKind::AuthNotOffered, "the relay did not offer AUTH"));
    }
    let resolve = |refresh| async move {
        let source = source.ok_or_else(|| {
            Failure::new(Stage::Auth, FailureKind::Credential, "stored credentials are not available in this process")
        })?;
        source.resolve(refresh).await
    };
    let resolved = match auth {
        Auth::None => unreachable!("handled above"),
        Auth::Integrated { keytab, principal, service_principal } => {
            require(&mechanisms, "GSSAPI")?;
            let service = service_principal.clone().unwrap_or_else(|| format!("smtp/{}", settings.host));
            let reply = gssapi_exchange(conn, keytab.clone(), principal.clone(), &service).await?;
            if reply.code != 235 {
                let mut failure = Failure::reply(Stage::Auth, reply);
                failure.detail =
                    format!("the relay refused the Kerberos authentication for {service}: {}", failure.detail);
                return Err(failure);
            }
            let who = principal.as_deref().unwrap_or("the default credential cache's principal");
            t.ok(
                Stage::Auth,
                format!("authenticated with Kerberos as {who} to {service}: {}", reply.one_line()),
                Some(&reply),
            );
            return Ok(());
        }
        Auth::Password { username, source } => Resolved {
            secret: AuthSecret::Password { username: username.clone(), password: read_password(source)? },
            token_note: None,
        },
        Auth::Stored { .. } | Auth::OAuth2 { .. } | Auth::Ntlm { .. } => resolve(false).await?,
    };
    if let Some(note) = &resolved.token_note {
        t.ok(Stage::Token, note.clone(), None);
    }
    let reply = match &resolved.secret {
        AuthSecret::Password { username, password } if matches!(auth, Auth::Ntlm { .. }) => {
            require(&mechanisms, "NTLM")?;
            ntlm_exchange(conn, username, password).await?
        }
        AuthSecret::Password { username, password } => password_exchange(conn, &mechanisms, username, password).await?,
        AuthSecret::XOAuth2 { user, token, .. } => {
            require(&mechanisms, "XOAUTH2")?;
            let first = xoauth2_exchange(conn, user, token).await?;
            if first.code == 235 || !is_rejected_token(&first) {
                first
            } else {
                // The cached token may have been revoked or expired early: one fresh token, once.
                let fresh = resolve(true).await?;
                if let Some(note) = &fresh.token_note {
                    t.ok(Stage::Token, format!("new token after the relay rejected the cached one: {note}"), None);
                }
                let AuthSecret::XOAuth2 { user, token, .. } = &fresh.secret else {
                    unreachable!("an OAuth2 source resolves tokens")
                };
                let second = xoauth2_exchange(conn, user, token).await?;
                if second.code != 235 {
                    return Err(rejected(second, &fresh.secret));
                }
                second
            }
        }
    };
    if reply.code != 235 {
        return Err(rejected(reply, &resolved.secret));
    }
    let who = match &resolved.secret {
        AuthSecret::Password { username, .. } => username,
        AuthSecret::XOAuth2 { user, .. } => user,
    };
    t.ok(Stage::Auth, format!("authenticated as {who}: {}", reply.one_line()), Some(&reply));
    if let Some(source) = source.filter(|_| auth.credential().is_some()) {
        source.used().await;
    }
    Ok(())
}

/// The relay's refusal; for OAuth2 it also says which token was refused and where it came from.
fn rejected(reply: SmtpReply, secret: &AuthSecret) -> Failure {
    let permanent = reply.is_permanent();
    let mut failure = Failure::reply(Stage::Auth, reply);
    if let AuthSecret::XOAuth2 { user, source, .. } = secret {
        failure.detail = format!("the relay rejected the OAuth2 token for {user}: {}; {source}", failure.detail);
        if permanent {
            failure.kind = FailureKind::TokenRefusedByRelay;
        }
    }
    failure
}

/// 535 or 5.7.x: the relay did not accept the token (as opposed to a temporary 454).
fn is_rejected_token(reply: &SmtpReply) -> bool {
    reply.code == 535 || (reply.is_permanent() && reply.enhanced.as_deref().is_some_and(|e| e.starts_with("5.7.")))
}

fn require(mechanisms: &[String], wanted: &str) -> Result<(), Failure> {
    if mechanisms.iter().any(|m| m == wanted) {
        Ok(())
    } else {
        Err(Failure::new(
            Stage::Auth,
            FailureKind::AuthNotOffered,
            format!("the relay offers AUTH {} but not {wanted}", mechanisms.join(" ")),
        ))
    }
}

async fn password_exchange(
    conn: &mut Connection,
    mechanisms: &[String],
    username: &str,
    password: &Secret,
) -> Result<SmtpReply, Failure> {
    if mechanisms.iter().any(|m| m == "PLAIN") {
        let raw = Zeroizing::new(format!("\0{username}\0{}", password.expose()));
        let line = Zeroizing::new(format!("AUTH PLAIN {}", B64.encode(raw.as_bytes())));
        conn.secret_command(Stage::Auth, &line).await
    } else if mechanisms.iter().any(|m| m == "LOGIN") {
        let mut reply = conn.secret_command(Stage::Auth, "AUTH LOGIN").await?;
        for part in [username, password.expose()] {
            if reply.code != 334 {
                break;
            }
            reply = conn.secret_command(Stage::Auth, &Zeroizing::new(B64.encode(part))).await?;
        }
        Ok(reply)
    } else {
        Err(Failure::new(
            Stage::Auth,
            FailureKind::AuthNotOffered,
            format!("the relay offers AUTH {} but Panel speaks PLAIN and LOGIN for passwords", mechanisms.join(" ")),
        ))
    }
}

/// RFC-less but universal XOAUTH2: on failure the server sends a 334 with a JSON error, the
/// client answers with an empty line, and the server sends the final 535.
async fn xoauth2_exchange(conn: &mut Connection, user: &str, token: &Secret) -> Result<SmtpReply, Failure> {
    let raw = Zeroizing::new(panel_domain::oauth::xoauth2_response(user, token.expose()));
    let line = Zeroizing::new(format!("AUTH XOAUTH2 {}", B64.encode(raw.as_bytes())));
    let reply = conn.secret_command(Stage::Auth, &line).await?;
    if reply.code != 334 {
        return Ok(reply);
    }
    let mut last = conn.secret_command(Stage::Auth, "").await?;
    if let Ok(json) = B64.decode(reply.text.trim())
        && let Ok(text) = String::from_utf8(json)
        && !text.is_empty()
    {
        last.text = format!("{} (relay said: {})", last.text, text.replace(['\r', '\n'], " "));
    }
    Ok(last)
}

/// SASL NTLM: NEGOTIATE, the relay's CHALLENGE, then AUTHENTICATE with NTLMv2 responses.
async fn ntlm_exchange(conn: &mut Connection, username: &str, password: &Secret) -> Result<SmtpReply, Failure> {
    let first =
        conn.secret_command(Stage::Auth, &format!("AUTH NTLM {}", B64.encode(crate::ntlm::negotiate()))).await?;
    if first.code != 334 {
        return Ok(first);
    }
    let challenge = B64
        .decode(first.text.trim())
        .map_err(|_| Failure::new(Stage::Auth, FailureKind::Protocol, "the relay's NTLM challenge is not base64"))
        .and_then(|m| {
            crate::ntlm::parse_challenge(&m).map_err(|e| Failure::new(Stage::Auth, FailureKind::Protocol, e))
        })?;
    let nonce = rand_bytes();
    // Windows time: 100 ns since 1601-01-01.
    let now = chrono::Utc::now();
    let timestamp = (now.timestamp() as u64 + 11_644_473_600) * 10_000_000 + now.timestamp_subsec_nanos() as u64 / 100;
    let workstation = crate::connection::local_hostname().to_uppercase();
    let message = crate::ntlm::authenticate(username, password.expose(), &workstation, &challenge, nonce, timestamp);
    let line = Zeroizing::new(B64.encode(&*message));
    conn.secret_command(Stage::Auth, &line).await
}

fn rand_bytes() -> [u8; 8] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut b).expect("the system RNG works");
    b
}

/// A Kerberos failure, with its cause and the fix (`panel smtp check` and the log show it).
fn kerberos_failure(e: crate::gssapi::GssError, service: &str) -> Failure {
    let text = e.0;
    let lower = text.to_ascii_lowercase();
    let (kind, cause) = if lower.contains("cannot contact any kdc") || lower.contains("cannot find kdc") {
        (FailureKind::KdcUnavailable, "no KDC answered; check krb5.conf's [realms] and the network".to_string())
    } else if lower.contains("clock skew") {
        (
            FailureKind::Kerberos,
            "clock skew: this host's clock differs too much from the KDC's; sync it (chrony/NTP)".to_string(),
        )
    } else if lower.contains("not found in kerberos database") && lower.contains("server") {
        (
            FailureKind::Kerberos,
            format!(
                "the relay's principal {service} is unknown to the KDC; register the SPN or set --service-principal"
            ),
        )
    } else if lower.contains("not found in kerberos database") {
        (FailureKind::Kerberos, "the service's principal is unknown to the KDC; check --principal".to_string())
    } else if lower.contains("key table") || lower.contains("keytab") || lower.contains("permission denied") {
        (FailureKind::Kerberos, "the keytab cannot be used: it is unreadable by the service, missing, or lacks the principal; check --keytab and --principal".to_string())
    } else if lower.contains("no kerberos credentials")
        || lower.contains("credentials cache")
        || lower.contains("no credentials")
    {
        (FailureKind::Kerberos, "no ticket: the service has no Kerberos credentials; run kinit as the service user or set --keytab and --principal".to_string())
    } else {
        (FailureKind::Kerberos, "Kerberos refused".to_string())
    };
    Failure::new(Stage::Auth, kind, format!("{cause} ({text})"))
}

/// One GSS-API call on the blocking pool: the context goes in and comes back with a token.
type GssStep = Box<dyn FnOnce() -> Result<(crate::gssapi::Context, Vec<u8>), crate::gssapi::GssError> + Send>;

/// SASL GSSAPI (RFC 4752): establish the context, then choose "no security layer" in the
/// wrapped reply to the relay's offer. The GSS-API calls block (they may talk to the KDC), so
/// they run on the blocking pool.
async fn gssapi_exchange(
    conn: &mut Connection,
    keytab: Option<std::path::PathBuf>,
    principal: Option<String>,
    service: &str,
) -> Result<SmtpReply, Failure> {
    use crate::gssapi::Context;
    let svc = service.to_string();
    let blocking =
        |f: GssStep| async move { tokio::task::spawn_blocking(f).await.expect("the GSS-API call does not panic") };
    let (mut ctx, mut token) = blocking(Box::new(move || {
        let mut c = Context::new(keytab.as_deref(), principal.as_deref(), &svc)?;
        let t = c.step(&[])?;
        Ok((c, t))
    }))
    .await
    .map_err(|e| kerberos_failure(e, service))?;
    let mut reply = conn.secret_command(Stage::Auth, &format!("AUTH GSSAPI {}", B64.encode(&token))).await?;
    for _ in 0..10 {
        if reply.code != 334 {
            return Ok(reply);
        }
        let challenge = B64.decode(reply.text.trim()).map_err(|_| {
            Failure::new(Stage::Auth, FailureKind::Protocol, "the relay's GSSAPI challenge is not base64")
        })?;
        if !ctx.is_complete() {
            let svc = service.to_string();
            (ctx, token) = blocking(Box::new(move || {
                let t = ctx.step(&challenge)?;
                Ok((ctx, t))
            }))
            .await
            .map_err(|e| kerberos_failure(e, &svc))?;
            reply = conn.secret_command(Stage::Auth, &B64.encode(&token)).await?;
            continue;
        }
        // The relay's security layer offer: 1 byte of layers, 3 bytes of max buffer size.
        let offer = ctx.unwrap(&challenge).map_err(|e| kerberos_failure(e, service))?;
        if offer.first().is_none_or(|layers| layers & 1 == 0) {
            return Err(Failure::new(
                Stage::Auth,
                FailureKind::Protocol,
                "the relay requires a GSSAPI security layer, which Panel does not use (TLS protects the connection)",
            ));
        }
        let choice = ctx.wrap(&[1, 0, 0, 0]).map_err(|e| kerberos_failure(e, service))?;
        reply = conn.secret_command(Stage::Auth, &B64.encode(choice)).await?;
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kerberos_failures_name_their_cause() {
        let cause = |text: &str| kerberos_failure(crate::gssapi::GssError(text.into()), "smtp/relay").detail;
        assert!(cause("No Kerberos credentials available (default cache: FILE:/tmp/x)").starts_with("no ticket"));
        assert!(cause("Clock skew too great").starts_with("clock skew"));
        assert!(cause("Server smtp/relay@EX.ORG not found in Kerberos database").contains("smtp/relay is unknown"));
        assert!(cause("Client 'x@EX.ORG' not found in Kerberos database").contains("--principal"));
        assert!(cause("Key table file '/k' not found").contains("keytab cannot be used"));
        let f = kerberos_failure(crate::gssapi::GssError("Cannot contact any KDC for realm 'EX.ORG'".into()), "s");
        assert_eq!(f.kind, FailureKind::KdcUnavailable, "retried, not a configuration error");
    }

    #[test]
    fn only_final_rejections_trigger_a_token_refresh() {
        assert!(is_rejected_token(&SmtpReply::from_lines(535, &["535 5.7.3 Authentication unsuccessful"])));
        assert!(is_rejected_token(&SmtpReply::from_lines(550, &["550 5.7.139 Authentication unsuccessful"])));
        assert!(!is_rejected_token(&SmtpReply::from_lines(454, &["454 4.7.0 Temporary authentication failure"])));
        assert!(!is_rejected_token(&SmtpReply::from_lines(504, &["504 5.5.4 Unrecognized mechanism"])));
    }
}
