//! License keys as Panel uses them: verified on add, and again at every use, against the
//! authorities this installation trusts (config file or environment only).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use panel_store::{AuditEvent, LicenseRow};
use panel_vault::license::{self, LicenseError};
use panel_vault::{AuthorityPublicKey, License};
use serde::Serialize;

use crate::error::OpsError;
use crate::ops::Panel;

/// A stored key as `panel license list` shows it.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct LicenseStatus {
    pub id: String,
    pub organization: Option<String>,
    pub domain: Option<String>,
    pub features: Vec<String>,
    pub trial: bool,
    pub issued_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub authority: Option<String>,
    pub valid: bool,
    /// Whether this process could verify the key's signature with the authorities it trusts;
    /// when not, nothing the key says (expiry, features) is known, and `problem` says why.
    pub verified: bool,
    /// Why the key grants nothing now, when it does not.
    pub problem: Option<String>,
    pub added_at: DateTime<Utc>,
    pub added_by: String,
}

/// Whether a feature is granted now, and until when.
#[derive(Debug, Clone)]
pub enum Grant {
    /// Granted; `until` is the latest expiry among the granting keys (`None`: never expires).
    Yes { until: Option<DateTime<Utc>> },
    /// Not granted, with the reason for the admin.
    No(String),
}

fn label(license: &License) -> String {
    license.issued_to.organization.clone()
}

impl Panel {
    /// The license authorities this process trusts now.
    pub fn authorities(&self) -> Arc<Vec<AuthorityPublicKey>> {
        self.secrets.authorities.read().expect("not poisoned").1.clone()
    }

    /// Changes with every `reload_authorities`.
    pub(crate) fn authorities_serial(&self) -> u64 {
        self.secrets.authorities.read().expect("not poisoned").0
    }

    /// Trusts `authorities` from now on (the config file changed): keys are judged by them at
    /// their next use, the workers rebuild their relay, and messages held by a configuration
    /// error (a license this process could not verify) get their next chance. Returns how
    /// many were released.
    pub async fn reload_authorities(&self, authorities: Vec<AuthorityPublicKey>) -> Result<u64, OpsError> {
        {
            let mut held = self.secrets.authorities.write().expect("not poisoned");
            *held = (held.0 + 1, Arc::new(authorities));
        }
        let released = match self.store.current_settings().await? {
            Some(s) => self.store.release_held(&s.doc, self.now(), panel_store::Release::All).await?,
            None => 0,
        };
        self.wake_workers().await;
        Ok(released)
    }

    /// Verifies `text` (signature, authority, expiry) and stores it. Nothing is stored on error.
    pub async fn add_license(&self, text: &str, by: &str) -> Result<License, OpsError> {
        if self.authorities().is_empty() {
            return Err(OpsError::License(
                "no license authority is trusted: set license.authorities in the config file or \
                 PANEL_LICENSE_AUTHORITIES to the authority's public key (authority.pub)"
                    .into(),
            ));
        }
        let license = license::check(text, &self.authorities(), self.now())?;
        let event = AuditEvent::new(
            "license.added",
            &license.id,
            format!("issued to {}, features {}", label(&license), license.features.join(",")),
        );
        if !self.store.add_license(&license.id, text.trim(), by, self.now(), &event).await? {
            return Err(OpsError::License(format!("license key {} is already added", license.id)));
        }
        self.wake_workers().await;
        Ok(license)
    }

    pub async fn remove_license(&self, id: &str, by: &str) -> Result<(), OpsError> {
        if self.store.remove_license(id, by, self.now()).await? {
            Ok(())
        } else {
            Err(OpsError::NotFoundNamed { what: "license key", name: id.to_string() })
        }
    }

    pub async fn licenses(&self) -> Result<Vec<LicenseStatus>, OpsError> {
        let from_domain = self.sender_domain().await;
        let now = self.now();
        let rows = self.store.licenses().await?;
        Ok(rows.iter().map(|row| self.status(row, now, from_domain.as_deref())).collect())
    }

    fn status(&self, row: &LicenseRow, now: DateTime<Utc>, from_domain: Option<&str>) -> LicenseStatus {
        let verified = license::verify(&row.key, &self.authorities());
        let problem = match &verified {
            Err(e) => Some(format!("not verified by this service: {e}")),
            Ok(l) if l.is_expired(now) => {
                Some(LicenseError::Expired { id: l.id.clone(), at: l.expires_at.unwrap_or(now) }.to_string())
            }
            Ok(l) if !l.domain_matches(from_domain) => Some(format!(
                "bound to the domain {}, but the relay settings' From address is {}",
                l.issued_to.domain.as_deref().unwrap_or(""),
                from_domain.map_or_else(|| "not set".to_string(), |d| format!("in {d}"))
            )),
            Ok(_) => None,
        };
        let l = verified.ok();
        LicenseStatus {
            id: row.id.clone(),
            organization: l.as_ref().map(|l| l.issued_to.organization.clone()),
            domain: l.as_ref().and_then(|l| l.issued_to.domain.clone()),
            features: l.as_ref().map(|l| l.features.clone()).unwrap_or_default(),
            trial: l.as_ref().is_some_and(|l| l.trial),
            issued_at: l.as_ref().map(|l| l.issued_at),
            expires_at: l.as_ref().and_then(|l| l.expires_at),
            authority: l.as_ref().map(|l| l.authority.clone()),
            valid: problem.is_none(),
            verified: l.is_some(),
            problem,
            added_at: row.added_at,
            added_by: row.added_by.clone(),
        }
    }

    /// Whether `feature` is granted now by any valid key (features are the union of valid keys).
    pub async fn grant(&self, feature: &str) -> Result<Grant, OpsError> {
        let statuses = self.licenses().await?;
        let granting: Vec<_> = statuses.iter().filter(|s| s.valid && s.features.iter().any(|f| f == feature)).collect();
        if !granting.is_empty() {
            let never = granting.iter().any(|s| s.expires_at.is_none());
            let until = if never { None } else { granting.iter().filter_map(|s| s.expires_at).max() };
            return Ok(Grant::Yes { until });
        }
        let mut why: Vec<String> = statuses
            .iter()
            .map(|s| match &s.problem {
                Some(p) => format!("{}: {p}", s.id),
                None => format!("{} does not grant it (features: {})", s.id, s.features.join(", ")),
            })
            .collect();
        if why.is_empty() {
            why.push("no license key is added".into());
        }
        Ok(Grant::No(format!(
            "the license feature '{feature}' is not granted ({}); add a license key that grants it with \
             `panel license add KEY` (your license authority issues keys with `panel license issue`)",
            why.join("; ")
        )))
    }

    /// The domain of the From address in force, which domain-bound licenses are checked against.
    async fn sender_domain(&self) -> Option<String> {
        let doc = self.store.current_settings().await.ok()??.doc;
        let from = panel_domain::Mailbox::parse("from", doc.from.as_deref()?).ok()?;
        from.address.as_str().rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase())
    }
}
