//! SMTP AUTH: where the secret comes from (a file, the environment, or Panel's credential store
//! through a `CredentialSource`) and the SASL exchanges (PLAIN, LOGIN, XOAUTH2). Secrets live in
//! zeroizing buffers and never enter a transcript, a failure or a log line.

use std::future::Future;
use std::pin::Pin;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use panel_domain::{Auth, Failure, FailureKind, PasswordSource, Secret, SmtpReply, Stage};
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
    auth: &Auth,
    source: Option<&dyn CredentialSource>,
    allow_plaintext: bool,
    t: &mut Transcript,
) -> Result<(), Failure> {
    if *auth == Auth::None {
        return Ok(());
    }
    if !conn.encrypted && !allow_plaintext {
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
        Auth::Password { username, source } => Resolved {
            secret: AuthSecret::Password { username: username.clone(), password: read_password(source)? },
            token_note: None,
        },
        Auth::Stored { .. } | Auth::OAuth2 { .. } => resolve(false).await?,
    };
    if let Some(note) = &resolved.token_note {
        t.ok(Stage::Token, note.clone(), None);
    }
    let reply = match &resolved.secret {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_final_rejections_trigger_a_token_refresh() {
        assert!(is_rejected_token(&SmtpReply::from_lines(535, &["535 5.7.3 Authentication unsuccessful"])));
        assert!(is_rejected_token(&SmtpReply::from_lines(550, &["550 5.7.139 Authentication unsuccessful"])));
        assert!(!is_rejected_token(&SmtpReply::from_lines(454, &["454 4.7.0 Temporary authentication failure"])));
        assert!(!is_rejected_token(&SmtpReply::from_lines(504, &["504 5.5.4 Unrecognized mechanism"])));
    }
}
