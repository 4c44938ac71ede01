//! `panel smtp check`: walk the whole conversation up to RCPT for the Fallback recipient, then
//! RSET and QUIT, so nothing is sent, and report every stage with the relay's words.

use std::sync::Arc;

use panel_domain::classify::{ConnectionContext, classify};
use panel_domain::{Failure, FailureClass, RelaySettings, Stage};
use serde::{Deserialize, Serialize};

use crate::auth::CredentialSource;
use crate::connection::{StageEvent, Transcript};
use crate::relay::Relay;
use crate::tls::TlsInfo;

/// Serializable both ways: a service runs the check and stores the report for the CLI that asked.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CheckReport {
    /// True only when a message to the Fallback recipient would be accepted (Graph: when the
    /// app gets a token with `Mail.Send`; only sending proves the mailbox).
    pub ok: bool,
    /// `smtp` or `graph`.
    #[serde(default)]
    pub transport: String,
    pub relay: String,
    pub security: String,
    pub stages: Vec<StageEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsInfo>,
    pub extensions: Vec<String>,
    pub auth_mechanisms: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<CheckFailure>,
    /// Messages held by a configuration error that this passing check sent again (set by the
    /// service that ran the check; a draft check releases nothing).
    #[serde(default)]
    pub released: u64,
    /// Where the check ran: the service that was asked, or this process. Delivery uses the
    /// service's environment, config file and trusted authorities, so that is where it counts.
    #[serde(default)]
    pub ran_in: String,
    /// The route checked: `primary`, or a standby's name.
    #[serde(default)]
    pub route: String,
    /// On the primary's report: each standby route's check, in the order they are tried.
    /// `ok` at the top is then true only when every route passed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub standby: Vec<CheckReport>,
    /// The route mail goes by now: the first, in order, whose check passed; none when all failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CheckFailure {
    pub stage: Stage,
    pub class: FailureClass,
    pub detail: String,
    pub code: Option<u16>,
    pub enhanced_code: Option<String>,
    /// The fix, naming `panel smtp set`'s flags.
    pub hint: Option<String>,
    /// The same fix naming the web form's fields.
    #[serde(default)]
    pub hint_form: Option<String>,
}

impl CheckFailure {
    pub fn new(f: &Failure, settings: &RelaySettings) -> CheckFailure {
        let c = classify(f, ConnectionContext { port: settings.port, security: settings.security });
        CheckFailure {
            stage: f.stage,
            class: c.class,
            detail: f.detail.clone(),
            code: f.reply.as_ref().map(|r| r.code),
            enhanced_code: f.reply.as_ref().and_then(|r| r.enhanced.clone()),
            hint_form: c.hint.as_deref().map(panel_domain::settings::table::hint_for_form),
            hint: c.hint,
        }
    }
}

/// Runs the check; `credentials` resolves stored credentials and tokens like the worker's.
pub async fn check(settings: Arc<RelaySettings>, credentials: Option<Arc<dyn CredentialSource>>) -> CheckReport {
    if settings.graph.is_some() {
        return crate::graph::check(settings, credentials).await;
    }
    let mut t = Transcript::default();
    let mut extensions = Vec::new();
    let mut auth = Vec::new();
    let result = async {
        let relay = Relay::new(settings.clone(), credentials).inspect_err(|f| t.failed(f))?;
        let mut conn = relay.connect(&mut t).await?;
        extensions = conn.extensions.list.clone();
        auth = conn.extensions.auth_mechanisms();
        // With a bounce domain messages go with a VERP envelope sender: the relay must take it.
        let from = match &settings.bounce_domain {
            Some(domain) => panel_domain::bounce::verp_address("0-check", domain),
            None => settings.from.address.to_string(),
        };
        let probed = conn.probe(&from, settings.fallback_recipient.as_str(), &mut t).await;
        if let Err(f) = &probed {
            t.failed(f);
        }
        if probed.is_ok() {
            conn.reset().await;
        }
        conn.quit(Some(&mut t)).await;
        probed
    }
    .await;
    let failure = result.err().map(|f| CheckFailure::new(&f, &settings));
    CheckReport {
        ok: failure.is_none(),
        transport: "smtp".into(),
        relay: crate::connection::relay_address(&settings),
        security: settings.security.to_string(),
        stages: t.events,
        tls: t.tls,
        extensions,
        auth_mechanisms: auth,
        failure,
        released: 0,
        ran_in: String::new(),
        route: panel_domain::PRIMARY.to_string(),
        standby: Vec::new(),
        in_use: None,
    }
}
