//! The relay settings operations: read the settings in force, save a change by the patch rules,
//! check the relay stage by stage, and the effective view the CLI and the API show.

use std::sync::Arc;
use std::time::Duration;

use panel_domain::settings::patch::{Applied, Channel, SettingsEvent};
use panel_domain::{Auth, CredentialKind, FieldErrors, RelaySettings, SettingsDoc};
use panel_relay::CheckReport;
use panel_store::{AuditEvent, Release};

use crate::credential_source::StoredCredentials;
use crate::error::OpsError;
use crate::ops::{Panel, SettingsUpdate};
use crate::views::{SettingsVersion, StoredSettings};

/// How long `smtp check` waits for a running service to take its request before checking
/// in its own process, and for the report after that (the check is bounded by its timeouts).
const CHECK_CLAIM_WAIT: Duration = Duration::from_secs(10);
const CHECK_RUN_WAIT: Duration = Duration::from_secs(300);

impl Panel {
    /// The settings in force, validated; `None` before the first save.
    pub async fn settings(&self) -> Result<Option<(i64, RelaySettings)>, OpsError> {
        if let Some(kept) = self.kept_settings() {
            return Ok(Some(kept));
        }
        let read = valid_settings(self.store.current_settings().await?)?;
        self.keep_settings(&read);
        Ok(read)
    }

    pub async fn stored_settings(&self) -> Result<Option<StoredSettings>, OpsError> {
        Ok(self.store.current_settings().await?.map(Into::into))
    }

    /// Applies `patch` to the stored settings by the patch rules (`settings::patch::apply`: every
    /// field validated once, nothing stored on error, a credential bound to its relay endpoint),
    /// then checks what only the service can: the CA file is readable, the credential exists and
    /// is of the kind the auth mode needs.
    pub async fn update_settings(
        &self,
        patch: &SettingsDoc,
        by: &str,
        channel: Channel,
    ) -> Result<SettingsUpdate, OpsError> {
        let current = self.store.current_settings().await?;
        let (version, old_doc) = match current {
            Some(s) => (s.version, s.doc),
            None => (0, SettingsDoc::default()),
        };
        let applied = panel_domain::settings::patch::apply(patch, &old_doc, channel).map_err(OpsError::Invalid)?;
        self.save_applied(version, applied, by, AuditEvent::new("settings.saved", "relay settings", String::new()))
            .await
    }

    /// Applies `patch` to the standby route `name` (made when new, tried after the others) by
    /// the patch rules (`settings::patch::apply_route`), with the same checks as a save.
    pub async fn update_route(
        &self,
        name: &str,
        patch: &SettingsDoc,
        by: &str,
        channel: Channel,
    ) -> Result<SettingsUpdate, OpsError> {
        let (version, old_doc) = match self.store.current_settings().await? {
            Some(s) => (s.version, s.doc),
            None => (0, SettingsDoc::default()),
        };
        let applied =
            panel_domain::settings::patch::apply_route(name, patch, &old_doc, channel).map_err(OpsError::Invalid)?;
        self.save_applied(version, applied, by, AuditEvent::new("settings.saved", "relay settings", String::new()))
            .await
    }

    /// Removes the standby route `name`.
    pub async fn remove_route(&self, name: &str, by: &str) -> Result<SettingsUpdate, OpsError> {
        let current = self.store.current_settings().await?.ok_or(OpsError::NotConfigured)?;
        let applied = panel_domain::settings::patch::remove_route(name, &current.doc).map_err(|e| {
            match e.0.first().is_some_and(|e| e.message.starts_with("there is no standby route")) {
                true => OpsError::NotFoundNamed { what: "standby route", name: name.to_string() },
                false => OpsError::Invalid(e),
            }
        })?;
        self.save_applied(
            current.version,
            applied,
            by,
            AuditEvent::new("settings.saved", "relay settings", String::new()),
        )
        .await
    }

    /// The saved versions, newest first (at most `limit`), each with what it changed from the
    /// one before it.
    pub async fn settings_history(&self, limit: usize) -> Result<Vec<SettingsVersion>, OpsError> {
        let limit = limit.clamp(1, 1000);
        // One more than shown: the oldest shown version's changes are against its predecessor.
        let rows = self.store.settings_versions(limit as i64 + 1).await?;
        let in_force = rows.first().map(|r| r.version);
        let empty = SettingsDoc::default();
        Ok(rows
            .iter()
            .enumerate()
            .take(limit)
            .map(|(i, r)| SettingsVersion {
                version: r.version,
                saved_at: r.saved_at,
                saved_by: r.saved_by.clone(),
                in_force: Some(r.version) == in_force,
                // The first version ever changes everything from the defaults; a version whose
                // predecessor is past the limit is compared with it all the same.
                changes: panel_domain::settings::patch::diff(rows.get(i + 1).map_or(&empty, |p| &p.doc), &r.doc),
            })
            .collect())
    }

    /// Makes an earlier version the settings in force, as a new version (the history keeps
    /// every step), by the same checks as a save (`patch::restore`).
    pub async fn restore_settings(&self, version: i64, by: &str, channel: Channel) -> Result<SettingsUpdate, OpsError> {
        let current = self.store.current_settings().await?.ok_or(OpsError::NotConfigured)?;
        let target = self
            .store
            .settings_version(version)
            .await?
            .ok_or_else(|| OpsError::NotFoundNamed { what: "relay settings version", name: version.to_string() })?;
        let applied =
            panel_domain::settings::patch::restore(&target.doc, &current.doc, channel).map_err(OpsError::Invalid)?;
        let event = AuditEvent::new("settings.restored", "relay settings", format!("version {version} restored"));
        self.save_applied(current.version, applied, by, event).await
    }

    /// Stores a change the patch rules accepted, after what only the service can check (the CA
    /// file is readable, the credential exists and is of the kind the auth mode needs), with
    /// `event` (its detail followed by the changes) and the credential events in the audit log.
    async fn save_applied(
        &self,
        version: i64,
        applied: Applied,
        by: &str,
        event: AuditEvent,
    ) -> Result<SettingsUpdate, OpsError> {
        let mut errors = FieldErrors::default();
        for (route, settings) in applied.settings.routes() {
            let mut found = FieldErrors::default();
            if let Some(ca) = &settings.ca_file
                && let Err(e) = std::fs::metadata(ca)
            {
                found.push("ca_file", format!("{} cannot be read: {e}", ca.display()));
            }
            if let Some(name) = settings.auth.credential() {
                self.check_credential_kind(&settings.auth, name, &mut found).await?;
            }
            // A standby's problems name their route, as validation names them.
            let field = |f: String| if route == panel_domain::PRIMARY { f } else { format!("routes.{route}.{f}") };
            errors.0.extend(found.0.into_iter().map(|e| panel_domain::FieldError::new(field(e.field), e.message)));
        }
        if !errors.is_empty() {
            return Err(OpsError::Invalid(errors));
        }
        // A save that changes nothing stores nothing: no new version, no audit entry.
        if version > 0 && applied.changes.is_empty() {
            // Saving again is also how an admin says "I fixed it outside Panel" (a password
            // file, a keytab): held messages get their next chance all the same.
            let released = self.store.release_held(&applied.doc, self.now(), Release::All).await?;
            let mut notices = applied.notices;
            notices.push(format!("nothing changed; version {version} stays in force"));
            if released > 0 {
                notices.push(format!("{released} message(s) held by a configuration error are tried again"));
                self.wake_workers().await;
            }
            return Ok(SettingsUpdate { version, settings: applied.settings, notices });
        }
        let mut events: Vec<AuditEvent> = applied
            .events
            .iter()
            .map(|e| match e {
                SettingsEvent::CredentialAttached { credential, relay } => {
                    AuditEvent::new("credential.attached", credential, format!("to relay {relay}"))
                }
                SettingsEvent::CredentialDetached { credential, from, to } => {
                    AuditEvent::new("credential.detached", credential, format!("relay changed from {from} to {to}"))
                }
            })
            .collect();
        let mut detail = applied.changes.clone();
        if !event.detail.is_empty() {
            detail.insert(0, event.detail.clone());
        }
        events.insert(0, AuditEvent { detail: detail.join("; "), ..event });
        let new_version = self.store.save_settings(version, &applied.doc, by, self.now(), &events).await?;
        // Workers pick the new version up on their next claim; wake them so held messages go now.
        self.wake_workers().await;
        Ok(SettingsUpdate { version: new_version, settings: applied.settings, notices: applied.notices })
    }

    /// The named credential must exist and be of the kind the auth mode needs.
    async fn check_credential_kind(&self, auth: &Auth, name: &str, errors: &mut FieldErrors) -> Result<(), OpsError> {
        let wanted = match auth {
            Auth::OAuth2 { provider, .. } => CredentialKind::for_provider(*provider),
            _ => &[CredentialKind::Password],
        };
        match self.store.credential(name).await? {
            None => errors.push(
                "credential",
                format!("no stored credential is named '{name}'; store it first: panel credential set {name} ..."),
            ),
            Some(c) if !wanted.iter().any(|k| c.kind == k.as_str()) => errors.push(
                "credential",
                format!(
                    "'{name}' is a {} credential, but auth = {} needs a {} credential",
                    c.kind,
                    auth.as_str(),
                    CredentialKind::either(wanted)
                ),
            ),
            Some(_) => {}
        }
        Ok(())
    }

    /// `panel smtp check`: the check runs where delivery runs. With a Panel Service or worker
    /// running, one of them is asked (through the store) and runs it with its own environment,
    /// config file and trusted authorities; the report says which. With none running, or when
    /// none takes the request within `CHECK_CLAIM_WAIT` (an older version), this process runs
    /// it and the report says so.
    pub async fn check_where_delivery_runs(&self, by: &str) -> Result<CheckReport, OpsError> {
        self.settings().await?.ok_or(OpsError::NotConfigured)?;
        if self.live_services().await?.is_empty() {
            return self.check_here("this CLI process (no Panel Service or worker is running)").await;
        }
        let id = self.store.request_check(by, self.now()).await?;
        self.wake_workers().await;
        let asked = tokio::time::Instant::now();
        loop {
            match self.store.check_request(id).await? {
                Some((Some(service), Some(stored))) => {
                    let answer: Result<CheckReport, String> = serde_json::from_str(&stored)
                        .map_err(|e| OpsError::internal("reading the service's check report", e))?;
                    let mut report = answer.map_err(|e| OpsError::internal("the service's check", e))?;
                    // A service whose config file changed since it loaded it says so: the
                    // check ran with what it loaded, not with what the file says now.
                    let note =
                        self.live_services().await?.into_iter().find(|s| s.id == service).and_then(|s| s.config_note);
                    report.ran_in = match note {
                        Some(note) => format!("service {service} ({note})"),
                        None => format!("service {service}"),
                    };
                    return Ok(report);
                }
                Some((None, _)) if asked.elapsed() > CHECK_CLAIM_WAIT && self.store.withdraw_check(id).await? => {
                    return self.check_here("this CLI process (no running service took the check within 10 s)").await;
                }
                Some((Some(service), None)) if asked.elapsed() > CHECK_RUN_WAIT => {
                    return Err(OpsError::internal(
                        "the service's check",
                        format!("service {service} took the check but gave no report within 5 minutes"),
                    ));
                }
                None => return Err(OpsError::internal("the check request", "it was removed before it was answered")),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Runs the check in this process, saying so.
    pub async fn check_here(&self, ran_in: &str) -> Result<CheckReport, OpsError> {
        let mut report = self.check().await?;
        report.ran_in = ran_in.to_string();
        Ok(report)
    }

    /// Runs the check a CLI asked this service for (request `id`) and stores the report, or
    /// the reason there is none.
    pub async fn answer_check(&self, id: i64) -> Result<(), OpsError> {
        let answer = self.check().await.map_err(|e| e.to_string());
        let stored = serde_json::to_string(&answer).map_err(|e| OpsError::internal("writing the check report", e))?;
        Ok(self.store.finish_check(id, &stored, self.now()).await?)
    }

    /// Checks every route of the settings in force, the primary first. A pass proves
    /// connection, TLS and AUTH work, so the messages a configuration error held at those
    /// stages go again now (when any route passed: it can take them).
    pub async fn check(&self) -> Result<CheckReport, OpsError> {
        let (_, settings) = self.settings().await?.ok_or(OpsError::NotConfigured)?;
        let mut reports = Vec::new();
        for (name, route) in settings.routes() {
            let mut report = self.check_route(route.clone()).await;
            report.route = name.to_string();
            reports.push(report);
        }
        let mut report = reports.remove(0);
        report.in_use = std::iter::once(&report).chain(&reports).find(|r| r.ok).map(|r| r.route.clone());
        report.ok = report.ok && reports.iter().all(|r| r.ok);
        report.standby = reports;
        if report.in_use.is_some() {
            report.released = self.store.release_held(&settings.doc, self.now(), Release::SessionFailures).await?;
            if report.released > 0 {
                self.wake_workers().await;
            }
        }
        Ok(report)
    }

    async fn check_route(&self, settings: RelaySettings) -> CheckReport {
        let credentials = StoredCredentials::for_settings(self, &settings, "smtp check");
        panel_relay::check(Arc::new(settings), credentials).await
    }

    /// Checks the settings as a form shows them before Save: `patch` applied to the stored
    /// settings by the same rules as a save from `channel` (so a draft cannot do what a save
    /// may not), and nothing stored. A stored credential goes only where a save would send it.
    pub async fn check_draft(
        &self,
        route: Option<&str>,
        patch: &SettingsDoc,
        channel: Channel,
    ) -> Result<CheckReport, OpsError> {
        use panel_domain::settings::patch;
        let current = self.store.current_settings().await?.map(|s| s.doc).unwrap_or_default();
        let applied = match route {
            None => patch::apply(patch, &current, channel),
            Some(name) => patch::apply_route(name, patch, &current, channel),
        }
        .map_err(OpsError::Invalid)?;
        if applied.changes.is_empty() && current != SettingsDoc::default() && route.is_none() {
            // The form as saved: a check of the settings in force, which may release held mail.
            return self.check().await;
        }
        let (name, mut settings, binding) = match route {
            None => (panel_domain::PRIMARY, applied.settings, current.credential_relay.clone()),
            Some(name) => {
                let stored = current.routes.iter().flatten().find(|r| r.name == name);
                let settings = applied.settings.standby.into_iter().find(|r| r.name == name).map(|r| r.settings);
                let settings = settings.ok_or_else(|| OpsError::internal("checking a route", "the route vanished"))?;
                (name, settings, stored.and_then(|r| r.settings.credential_relay.clone()))
            }
        };
        // Naming the credential in a draft does not confirm it for a new relay: only a save does.
        settings.credential_attached = settings.bound_to(binding.as_deref());
        let mut report = self.check_route(settings).await;
        report.route = name.to_string();
        report.in_use = report.ok.then(|| name.to_string());
        Ok(report)
    }
}

/// The settings in force with every default filled in, as shown by `panel smtp show` and the API
/// (the settings table's effective view), with the stored credential's binding state.
/// Names where the password comes from, never the password.
impl Panel {
    /// The recipient policy's notice (`RecipientPolicy::notice`) for the settings in force;
    /// `None` for plain delivery or when nothing can be read.
    pub async fn policy_notice(&self) -> Option<String> {
        match self.settings().await {
            Ok(Some((_, s))) => s.policy.notice(),
            _ => None,
        }
    }
}

pub fn effective_view(s: &RelaySettings) -> serde_json::Value {
    let mut view = route_view(s);
    if !s.standby.is_empty() {
        let routes: Vec<serde_json::Value> = s
            .standby
            .iter()
            .map(|r| {
                let mut own = route_view(&r.settings);
                // Only the route's own settings: the installation's are shown once, above.
                own.retain(|k, _| panel_domain::settings::table::setting(k).is_none_or(|s| !s.whole));
                serde_json::json!({"name": r.name, "settings": own})
            })
            .collect();
        view.insert("routes".into(), routes.into());
    }
    serde_json::Value::Object(view)
}

fn route_view(s: &RelaySettings) -> serde_json::Map<String, serde_json::Value> {
    let mut view = panel_domain::settings::table::effective(&s.doc);
    if s.auth.credential().is_some() {
        view.insert("credential_status".into(), if s.credential_attached { "attached" } else { "detached" }.into());
    }
    view
}

/// Stored settings, validated (`Panel::settings`).
pub(crate) fn valid_settings(
    stored: Option<panel_store::StoredSettings>,
) -> Result<Option<(i64, RelaySettings)>, OpsError> {
    let Some(stored) = stored else { return Ok(None) };
    RelaySettings::validate(&stored.doc)
        .map(|s| Some((stored.version, s)))
        .map_err(|errors| OpsError::StoredSettingsInvalid { version: stored.version, errors })
}
