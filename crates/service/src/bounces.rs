//! After the relay's 250: the VERP token that makes a bounce attributable to its message, and
//! what a report received by the bounce listener does (`Panel::receive_report`).

use panel_domain::bounce::{ReportKind, read_report, verp_token};
use panel_domain::{MessageState, RecipientState};
use panel_store::BounceRow;

use crate::error::OpsError;
use crate::ops::Panel;

/// Bytes of the HMAC in a token: 80 bits, hex, so a forged bounce must guess them.
const TAG_BYTES: usize = 10;
/// Bytes of a report kept with its record.
const KEPT: usize = 64 * 1024;

/// Where a report came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The bounce listener: matched by the VERP token of its envelope recipient only.
    Listener,
    /// A mailbox read over IMAP: by a VERP token in its To header, else by the Message-ID it
    /// returns.
    Mailbox,
}

/// What one received report did, for the listener's log and reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub kind: ReportKind,
    /// The message it was matched to (none: kept unmatched).
    pub message: Option<i64>,
    /// The message's state when the report changed it.
    pub state: Option<MessageState>,
}

impl Panel {
    /// The key that signs VERP tokens, read once per process (made once per installation).
    async fn bounce_key(&self) -> Result<ring::hmac::Key, OpsError> {
        if let Some(key) = self.bounce_key.get() {
            return Ok(key.clone());
        }
        let fresh = format!("{:032x}{:032x}", crate::random_u128(), crate::random_u128());
        let stored = self.store.bounce_key(&fresh).await?;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, stored.as_bytes());
        Ok(self.bounce_key.get_or_init(|| key).clone())
    }

    /// The VERP token of message `id`: `ID-TAG`, the tag an HMAC of the id under the
    /// installation's key, so a bounce that carries it is about that message and nothing can
    /// forge one for another.
    pub async fn bounce_token(&self, id: i64) -> Result<String, OpsError> {
        Ok(format!("{id}-{}", hex::encode(self.bounce_tag(id).await?)))
    }

    /// The tag of message `id`'s token: the first `TAG_BYTES` of the HMAC of its id.
    async fn bounce_tag(&self, id: i64) -> Result<Vec<u8>, OpsError> {
        let key = self.bounce_key().await?;
        Ok(ring::hmac::sign(&key, id.to_string().as_bytes()).as_ref()[..TAG_BYTES].to_vec())
    }

    /// The message a token is for, when its tag verifies.
    async fn token_message(&self, token: &str) -> Result<Option<i64>, OpsError> {
        let Some((id, tag)) = token.split_once('-') else { return Ok(None) };
        let Ok(id) = id.parse::<i64>() else { return Ok(None) };
        let Ok(given) = hex::decode(tag) else { return Ok(None) };
        let expected = self.bounce_tag(id).await?;
        // Constant time: the comparison says nothing about how much of a guess was right.
        let same = given.len() == expected.len() && given.iter().zip(&expected).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0;
        Ok(same.then_some(id))
    }

    /// A report the bounce listener received for `envelope_to` (its RCPT TO addresses):
    /// matched to its message by the VERP token of the bounce domain, read (a DSN, a
    /// non-standard bounce, an auto-reply) and stored. A bounce moves its recipient to bounced
    /// (a delay notice to delayed) and the message on, and tells the workflows
    /// (`message.bounced`). A report without a token that verifies is kept unmatched and
    /// changes no message. Bounded: at most `MAX_REPORT` bytes are read.
    pub async fn receive_report(&self, envelope_to: &[String], raw: &[u8]) -> Result<Receipt, OpsError> {
        self.take_report(envelope_to, raw, Source::Listener).await
    }

    async fn take_report(&self, envelope_to: &[String], raw: &[u8], source: Source) -> Result<Receipt, OpsError> {
        let settings = self.settings().await?.map(|(_, s)| s);
        let domain = settings.as_ref().and_then(|s| s.bounce_domain.clone());
        let report = read_report(raw);
        let kept = String::from_utf8_lossy(&raw[..raw.len().min(KEPT)]).into_owned();
        let to = envelope_to.first().cloned().unwrap_or_default();
        let mut message = None;
        let mut reason = None;
        let token = domain.as_deref().and_then(|d| envelope_to.iter().find_map(|a| verp_token(a, d)));
        match (token, source) {
            (Some(token), _) => match self.token_message(token).await? {
                None => reason = Some("its token does not verify: forged, or from another installation".into()),
                Some(id) => match self.store.bounce_target(id).await? {
                    None => reason = Some(format!("message {id} is no longer stored")),
                    Some(target) => message = Some(target),
                },
            },
            // In a mailbox (bounces to the From address): by the Message-ID the report returns,
            // 128 random bits that only the message's recipients and relays have seen.
            (None, Source::Mailbox) => {
                let returned = report.original_message_id.clone().or_else(|| report.envid.clone());
                match returned {
                    None => reason = Some("it returns no Message-ID of a message Panel sent".into()),
                    Some(mid) => match self.store.message_by_header_id(&mid).await? {
                        None => reason = Some(format!("no stored message has the Message-ID {mid}")),
                        Some(id) => message = self.store.bounce_target(id).await?,
                    },
                }
            }
            (None, Source::Listener) => {
                reason = Some(match &domain {
                    None => "no bounce domain is set (panel smtp set --bounce-domain)".to_string(),
                    Some(domain) => format!("sent to no bounces+TOKEN@{domain} address"),
                })
            }
        }
        let base = BounceRow {
            kind: report.kind.as_str().to_string(),
            envelope_to: to.chars().take(320).collect(),
            subject: report.subject.clone(),
            reporting_mta: report.reporting_mta.clone(),
            report: kept,
            ..BounceRow::default()
        };
        let mut rows = Vec::new();
        let Some(target) = message else {
            rows.push(BounceRow { reason, ..base });
            self.store.record_bounce(None, &rows, self.now()).await?;
            self.metrics.bounce("unmatched");
            tracing::warn!(to = %to, kind = report.kind.as_str(), "a report matched no message; kept unmatched");
            return Ok(Receipt { kind: report.kind, message: None, state: None });
        };
        let moves = |kind: ReportKind| match kind {
            ReportKind::Failed => Some(RecipientState::Bounced),
            ReportKind::Delayed => Some(RecipientState::Delayed),
            _ => None,
        };
        let own = |address: &str| target.recipients.iter().any(|(a, _)| a.eq_ignore_ascii_case(address));
        if !report.recipients.is_empty() {
            for r in &report.recipients {
                let ours = own(&r.recipient);
                rows.push(BounceRow {
                    kind: r.kind.as_str().to_string(),
                    recipient: Some(r.recipient.clone()),
                    status: r.status.clone(),
                    diagnostic: r.diagnostic.clone(),
                    remote_mta: r.remote_mta.clone(),
                    reason: (!ours).then(|| "not a recipient of this message".to_string()),
                    moves_to: if ours { moves(r.kind) } else { None },
                    ..base.clone()
                });
            }
        } else if report.kind == ReportKind::Failed {
            // A non-standard bounce names its recipients in its text; with one recipient it
            // can only be about that one.
            let text = report.text.to_ascii_lowercase();
            let mut named: Vec<&str> = target
                .recipients
                .iter()
                .map(|(a, _)| a.as_str())
                .filter(|a| text.contains(&a.to_ascii_lowercase()))
                .collect();
            if named.is_empty() && target.recipients.len() == 1 {
                named.push(&target.recipients[0].0);
            }
            if named.is_empty() {
                rows.push(BounceRow {
                    diagnostic: report.diagnostic.clone(),
                    reason: Some("the bounce names none of the message's recipients".into()),
                    ..base.clone()
                });
            }
            for address in named {
                rows.push(BounceRow {
                    recipient: Some(address.to_string()),
                    diagnostic: report.diagnostic.clone(),
                    moves_to: Some(RecipientState::Bounced),
                    ..base.clone()
                });
            }
        } else {
            let why = match report.kind {
                ReportKind::AutoReply => "an automatic reply (out of office): not a bounce",
                ReportKind::Delivered => "a report of delivery: nothing failed",
                _ => "not a delivery report",
            };
            rows.push(BounceRow { reason: Some(why.into()), ..base.clone() });
        }
        let state = self.store.record_bounce(Some(target.id), &rows, self.now()).await?;
        for row in &rows {
            self.metrics.bounce(&row.kind);
        }
        tracing::info!(message_id = target.id, kind = report.kind.as_str(), state = ?state, "report received");
        for row in rows.iter().filter(|r| r.moves_to == Some(RecipientState::Bounced)) {
            self.tell_workflows(target.id, row).await;
        }
        Ok(Receipt { kind: report.kind, message: Some(target.id), state })
    }

    /// `message.bounced` for the workflows, with the recipient and the reason; a failure to run
    /// them is logged, never the listener's (the bounce is stored either way).
    async fn tell_workflows(&self, id: i64, row: &BounceRow) {
        let object = serde_json::json!({
            "message_id": id,
            "recipient": row.recipient,
            "status": row.status,
            "diagnostic": row.diagnostic,
            "remote_mta": row.remote_mta,
        });
        let key = format!("bounce-{id}-{}", row.recipient.as_deref().unwrap_or_default());
        let key: String =
            key.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '@')).take(100).collect();
        if let Err(e) = self.post_event("message.bounced", &object, Some(&key), "bounce listener").await {
            tracing::warn!(message_id = id, error = %e, "could not tell the workflows of the bounce");
        }
    }

    /// Received reports, newest first (`unmatched`: only those matched to no message).
    pub async fn bounces(&self, unmatched: bool, limit: usize) -> Result<Vec<crate::views::Bounce>, OpsError> {
        Ok(self.store.bounces(unmatched, limit.clamp(1, 1000) as i64).await?.into_iter().map(Into::into).collect())
    }
}

/// What the bounce listener (`panel_relay::inbound`) calls: the bounce domain in force, and
/// `Panel::receive_report` for each message it takes.
pub struct BounceHandler(pub Panel);

impl panel_relay::inbound::InboundHandler for BounceHandler {
    fn domain(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send + '_>> {
        Box::pin(async move { self.0.settings().await.ok().flatten().and_then(|(_, s)| s.bounce_domain) })
    }

    fn deliver(
        &self,
        recipients: Vec<String>,
        data: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move { self.0.receive_report(&recipients, &data).await.map(|_| ()).map_err(|e| e.to_string()) })
    }
}

/// The mailbox bounces land in (`[bounces] imap_url` and how to sign in), and where Panel
/// moves what it matched.
#[derive(Clone)]
pub struct BounceMailbox {
    pub url: panel_domain::bounce::ImapUrl,
    pub auth: MailboxAuth,
    pub ca_file: Option<std::path::PathBuf>,
    pub processed: String,
}

/// How Panel signs in to the bounce mailbox.
#[derive(Clone)]
pub enum MailboxAuth {
    /// The password read from `imap_password_file`.
    Password(zeroize::Zeroizing<String>),
    /// A stored credential: a password one (LOGIN), or a Microsoft or Google app (XOAUTH2 with
    /// a token for the mailbox), the token endpoint overridable like the relay's.
    Credential { name: String, token_endpoint: Option<panel_domain::EndpointUrl> },
}

impl BounceMailbox {
    /// The mailbox as its key and logs name it: `user@host/folder`.
    pub fn name(&self) -> String {
        format!("{}@{}/{}", self.url.username, self.url.host, self.url.folder)
    }
}

/// What one pass over the mailbox did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MailboxPass {
    /// New messages read.
    pub read: usize,
    /// Of them, matched to a message (and moved to the processed folder).
    pub matched: usize,
    /// Of them, left in the folder (unmatched; listed by `panel bounces list --unmatched`).
    pub left: usize,
}

/// At most this many messages in one pass; the next pass takes the rest.
const PASS_LIMIT: usize = 1000;

impl Panel {
    /// Reads the new messages of the bounce mailbox once: each is taken as a report (its own
    /// short transaction: none is held across the network), what matched a message is moved
    /// to `processed`, the rest is left alone, and how far it read is remembered (by UID under
    /// the folder's UIDVALIDITY), so nothing is read twice.
    pub async fn read_bounce_mailbox(&self, m: &BounceMailbox) -> Result<MailboxPass, OpsError> {
        use panel_relay::imap::{ImapAuth, ImapConfig, ImapSecurity};
        // The mailbox, not the way to it: IMAPS or STARTTLS, it is read from where it was left.
        let key = m.name();
        let fail = |e: String| OpsError::internal("reading the bounce mailbox", e);
        let auth = match &m.auth {
            MailboxAuth::Password(p) => ImapAuth::Password(p.clone()),
            MailboxAuth::Credential { name, token_endpoint } => {
                ImapAuth::Stored(self.mailbox_credential(name, &m.url.username, token_endpoint.clone()).await?)
            }
        };
        let imap = ImapConfig {
            host: m.url.host.clone(),
            port: m.url.port,
            security: if m.url.implicit_tls { ImapSecurity::Tls } else { ImapSecurity::Starttls },
            username: m.url.username.clone(),
            auth,
            ca_file: m.ca_file.clone(),
            timeout: std::time::Duration::from_secs(60),
        };
        let mut session = panel_relay::imap::Session::connect(&imap).await.map_err(fail)?;
        let validity = session.select(&m.url.folder).await.map_err(fail)? as i64;
        let after = match self.store.mailbox_mark(&key).await? {
            Some((v, last)) if v == validity => last as u32,
            _ => 0,
        };
        let uids = session.uids_after(after, PASS_LIMIT).await.map_err(fail)?;
        let mut pass = MailboxPass::default();
        if !uids.is_empty() {
            session.ensure_folder(&m.processed).await.map_err(fail)?;
        }
        for uid in uids {
            let raw = session.fetch(uid).await.map_err(fail)?;
            let to = header_addresses(&raw, "to");
            let receipt = self.take_report(&to, &raw, Source::Mailbox).await?;
            pass.read += 1;
            if receipt.message.is_some() {
                session.move_to(uid, &m.processed).await.map_err(fail)?;
                pass.matched += 1;
            } else {
                pass.left += 1;
            }
            self.store.set_mailbox_mark(&key, validity, i64::from(uid)).await?;
        }
        session.logout().await;
        if pass.read > 0 {
            tracing::info!(mailbox = %key, read = pass.read, matched = pass.matched, left = pass.left, "bounce mailbox read");
        }
        Ok(pass)
    }

    /// The stored credential `name` as the mailbox's sign-in: a password credential signs in
    /// as its own user; a Microsoft or Google app gets a token for `mailbox` (license-gated and
    /// cached like the relay's).
    async fn mailbox_credential(
        &self,
        name: &str,
        mailbox: &str,
        token_endpoint: Option<panel_domain::EndpointUrl>,
    ) -> Result<std::sync::Arc<dyn panel_relay::CredentialSource>, OpsError> {
        use panel_domain::{Auth, CredentialKind, OAuthProvider};
        let row = self
            .store
            .credential(name)
            .await?
            .ok_or_else(|| OpsError::NotFoundNamed { what: "credential", name: name.to_string() })?;
        let provider = [OAuthProvider::Microsoft, OAuthProvider::Google]
            .into_iter()
            .find(|p| CredentialKind::for_provider(*p).iter().any(|k| k.as_str() == row.kind));
        let auth = match provider {
            None => Auth::Stored { credential: name.to_string() },
            Some(provider) => {
                let mailbox = panel_domain::EmailAddress::parse("imap_url", mailbox).map_err(|e| {
                    OpsError::Invalid(panel_domain::FieldErrors(vec![panel_domain::FieldError::new(
                        "bounces.imap_url",
                        format!("with an OAuth2 credential the user is the mailbox's address: {}", e.message),
                    )]))
                })?;
                Auth::OAuth2 { provider, mailbox, credential: name.to_string(), token_endpoint }
            }
        };
        Ok(crate::credential_source::StoredCredentials::for_auth(self, auth, "bounce mailbox"))
    }
}

/// The addresses of header `name` of a raw message (for a VERP token in a bounce's To).
fn header_addresses(raw: &[u8], name: &str) -> Vec<String> {
    let head = &raw[..raw.len().min(64 * 1024)];
    let text = String::from_utf8_lossy(head);
    let value = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.to_string())
        })
        .unwrap_or_default();
    value
        .split([',', ' ', '<', '>'])
        .filter(|w| w.contains('@'))
        .map(|w| w.trim_matches(['"', '\'', ';']).to_string())
        .take(20)
        .collect()
}
