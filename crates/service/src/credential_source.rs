//! The relay's view of Panel's credential store: resolves the stored password or an OAuth2
//! token at connection time, after checking the license, and caches tokens until shortly
//! before they expire.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use panel_domain::{Auth, CredentialKind, Failure, FailureKind, OAuthProvider, RelaySettings, Stage};
use panel_relay::oauth::{AppCertificate, ServiceAccountKey, TokenClient, TokenGrant, fetch_token};
use panel_relay::{AuthSecret, BoxFuture, CredentialSource, Resolved};
use panel_store::{AuditEvent, CredentialRow};

use crate::ops::Panel;

pub(crate) struct StoredCredentials {
    panel: Panel,
    auth: Auth,
    /// Who uses the credential, for the audit log's first-use entry.
    actor: String,
    timeout: Duration,
    /// Microsoft's token scope: SMTP's, or Graph's with `transport = graph`.
    scope: &'static str,
    token: tokio::sync::Mutex<Option<(TokenGrant, DateTime<Utc>)>>,
    /// The credential last opened: (id, name), for the first-use entry.
    opened: Mutex<Option<(String, String)>>,
}

impl StoredCredentials {
    /// A source for `settings` when they use a stored credential; `None` otherwise.
    pub(crate) fn for_settings(
        panel: &Panel,
        settings: &RelaySettings,
        actor: &str,
    ) -> Option<Arc<dyn CredentialSource>> {
        settings.auth.credential()?;
        Some(Arc::new(StoredCredentials {
            panel: panel.clone(),
            auth: settings.auth.clone(),
            actor: actor.to_string(),
            timeout: settings.command_timeout,
            scope: match settings.transport {
                panel_domain::Transport::Graph => OAuthProvider::GRAPH_SCOPE,
                panel_domain::Transport::Smtp => OAuthProvider::Microsoft.scope(),
            },
            token: tokio::sync::Mutex::new(None),
            opened: Mutex::new(None),
        }))
    }

    /// A source for `auth` outside the relay settings (the bounce mailbox): Microsoft tokens
    /// for Outlook (SMTP and IMAP share the scope).
    pub(crate) fn for_auth(panel: &Panel, auth: Auth, actor: &str) -> Arc<dyn CredentialSource> {
        Arc::new(StoredCredentials {
            panel: panel.clone(),
            auth,
            actor: actor.to_string(),
            timeout: Duration::from_secs(30),
            scope: OAuthProvider::Microsoft.scope(),
            token: tokio::sync::Mutex::new(None),
            opened: Mutex::new(None),
        })
    }

    async fn open(
        &self,
        stage: Stage,
        name: &str,
        kinds: &[CredentialKind],
    ) -> Result<(CredentialRow, panel_domain::Secret), Failure> {
        let (row, secret) = self
            .panel
            .open_credential(name, kinds)
            .await
            .map_err(|e| Failure::new(stage, FailureKind::Credential, e))?;
        *self.opened.lock().expect("not poisoned") = Some((row.id.clone(), row.name.clone()));
        Ok((row, secret))
    }

    async fn token(
        &self,
        refresh: bool,
        provider: OAuthProvider,
        mailbox: &str,
        name: &str,
        endpoint: Option<&panel_domain::EndpointUrl>,
    ) -> Result<Resolved, Failure> {
        let mut cache = self.token.lock().await;
        let now = self.panel.now();
        // The license is checked at every use, cached token or not.
        let (row, secret) = self.open(Stage::Token, name, CredentialKind::for_provider(provider)).await?;
        if !refresh
            && let Some((grant, obtained)) = cache.as_ref()
            && still_fresh(grant, *obtained, now)
        {
            let note = format!(
                "cached token, expires at {}",
                grant.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            return Ok(resolved(mailbox, grant, note));
        }
        let bad = |detail: String| Failure::new(Stage::Token, FailureKind::Credential, detail);
        let client = match provider {
            OAuthProvider::Microsoft => {
                let tenant = row.attributes.get("tenant").and_then(|t| t.as_str()).unwrap_or("organizations");
                let url = match endpoint {
                    Some(u) => u.clone(),
                    None => panel_domain::EndpointUrl::parse(&provider.default_token_endpoint(tenant)).map_err(bad)?,
                };
                let client_id = row.username.clone();
                match CredentialKind::parse(&row.kind) {
                    Some(CredentialKind::MicrosoftCertificate) => {
                        let certificate = AppCertificate::parse(secret.expose().as_bytes())
                            .map_err(|e| bad(format!("the stored credential '{name}': {e}")))?;
                        TokenClient::MicrosoftCertificate {
                            endpoint: url,
                            client_id,
                            certificate: Box::new(certificate),
                            scope: self.scope,
                        }
                    }
                    _ => TokenClient::Microsoft { endpoint: url, client_id, client_secret: secret, scope: self.scope },
                }
            }
            OAuthProvider::Google => {
                let key = ServiceAccountKey::parse(secret.expose().as_bytes())
                    .map_err(|e| bad(format!("the stored credential '{name}': {e}")))?;
                let url = match endpoint {
                    Some(u) => u.clone(),
                    None => {
                        let default = provider.default_token_endpoint("");
                        panel_domain::EndpointUrl::parse(key.token_uri.as_deref().unwrap_or(&default)).map_err(bad)?
                    }
                };
                TokenClient::Google { endpoint: url, key: Box::new(key), subject: mailbox.to_string() }
            }
        };
        let grant = fetch_token(&client, self.timeout).await?;
        let note = grant.note.clone();
        let out = resolved(mailbox, &grant, note);
        *cache = Some((grant, now));
        Ok(out)
    }
}

/// A token is reused until half its lifetime or five minutes before expiry, whichever is later.
fn still_fresh(grant: &TokenGrant, obtained: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    let lifetime = grant.expires_at - obtained;
    let margin = (lifetime / 2).min(chrono::Duration::minutes(5));
    now + margin < grant.expires_at
}

fn resolved(mailbox: &str, grant: &TokenGrant, note: String) -> Resolved {
    Resolved {
        secret: AuthSecret::XOAuth2 {
            user: mailbox.to_string(),
            token: grant.access_token.clone(),
            source: grant.note.clone(),
        },
        token_note: Some(note),
    }
}

impl CredentialSource for StoredCredentials {
    fn resolve(&self, refresh: bool) -> BoxFuture<'_, Result<Resolved, Failure>> {
        Box::pin(async move {
            match &self.auth {
                Auth::Stored { credential } | Auth::Ntlm { credential } => {
                    let (row, password) = self.open(Stage::Auth, credential, &[CredentialKind::Password]).await?;
                    Ok(Resolved { secret: AuthSecret::Password { username: row.username, password }, token_note: None })
                }
                Auth::OAuth2 { provider, mailbox, credential, token_endpoint } => {
                    self.token(refresh, *provider, mailbox.as_str(), credential, token_endpoint.as_ref()).await
                }
                Auth::None | Auth::Password { .. } | Auth::Integrated { .. } => {
                    Err(Failure::new(Stage::Auth, FailureKind::Credential, "these settings use no stored credential"))
                }
            }
        })
    }

    fn used(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some((id, name)) = self.opened.lock().expect("not poisoned").clone() else { return };
            let event =
                AuditEvent::new("credential.first_used", &name, "first successful authentication with the relay");
            if let Err(e) = self.panel.store.mark_credential_used(&id, &self.actor, self.panel.now(), &event).await {
                tracing::warn!(error = %e, credential = %name, "recording the credential's first use failed");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(lifetime_secs: i64, obtained: DateTime<Utc>) -> TokenGrant {
        TokenGrant {
            access_token: panel_domain::Secret::new("t".into()),
            expires_at: obtained + chrono::Duration::seconds(lifetime_secs),
            endpoint: String::new(),
            note: String::new(),
        }
    }

    #[test]
    fn tokens_are_refreshed_before_they_expire() {
        let t0 = Utc::now();
        let hour = grant(3600, t0);
        assert!(still_fresh(&hour, t0, t0 + chrono::Duration::minutes(50)));
        assert!(!still_fresh(&hour, t0, t0 + chrono::Duration::minutes(56)));
        // Short-lived tokens are reused for half their lifetime.
        let short = grant(60, t0);
        assert!(still_fresh(&short, t0, t0 + chrono::Duration::seconds(20)));
        assert!(!still_fresh(&short, t0, t0 + chrono::Duration::seconds(31)));
    }
}
