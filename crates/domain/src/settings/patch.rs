//! The patch rules: how a change to the relay settings becomes the next stored document. Pure:
//! `apply(patch, current)` gives the document to store, the validated settings, what the admin
//! must be told, and what the audit log records. The one validation of a save runs here.

use super::table::{SETTINGS, SettingsDoc, modes};
use super::{AuthMode, RelaySettings, Security, endpoint_key, validate_host};
use crate::errors::FieldErrors;

/// A saved change, before it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub doc: SettingsDoc,
    pub settings: RelaySettings,
    /// What the admin must know: dropped fields, a detached credential.
    pub notices: Vec<String>,
    pub events: Vec<SettingsEvent>,
}

/// What the audit log records about a save, beyond the save itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingsEvent {
    /// The credential was confirmed for `relay`.
    CredentialAttached { credential: String, relay: String },
    /// The relay changed under the credential, so it is no longer sent.
    CredentialDetached { credential: String, from: String, to: String },
}

/// Applies `patch` to `current`:
/// - a field the patch names replaces the stored one, `''` clears it;
/// - naming a mode (`auth`, `security`) drops the stored fields that mode does not use (the
///   table's `uses`), unless the patch names them too, with a notice;
/// - naming one password source replaces the other kind (`credential` vs. a file or variable);
/// - a stored credential is bound to the relay endpoint it was named for: changing the host,
///   port or security detaches it (a notice and an audit event) until it is named again.
///
/// Every problem of the result is reported at once; nothing is applied on error.
pub fn apply(patch: &SettingsDoc, current: &SettingsDoc) -> Result<Applied, FieldErrors> {
    let mut doc = current.merged(patch);
    let mut notices = Vec::new();
    let (auth, security) = modes(&doc);
    if patch.names("auth") && AuthMode::parse(patch.auth.as_deref().unwrap_or_default()).is_some() {
        let unused = |s: &&super::table::Setting| !s.uses.auth_uses(auth);
        drop_fields(&mut doc, patch, unused, &format!("auth {auth}"), &mut notices);
    }
    if patch.names("security") && Security::parse(patch.security.as_deref().unwrap_or_default()).is_some() {
        let unused = |s: &&super::table::Setting| !s.uses.security_uses(security);
        drop_fields(&mut doc, patch, unused, &format!("security {security}"), &mut notices);
    }
    // One password source at a time: the one the patch names wins.
    if auth == AuthMode::Password && patch.names("credential") {
        let external = |s: &&super::table::Setting| matches!(s.name, "username" | "password_file" | "password_env");
        drop_fields(&mut doc, patch, external, "a stored credential", &mut notices);
    }
    if patch.names("password_file") || patch.names("password_env") {
        let stored = |s: &&super::table::Setting| s.name == "credential";
        drop_fields(&mut doc, patch, stored, "a password kept outside Panel", &mut notices);
    }

    let mut settings = RelaySettings::validate(&doc)?;
    let mut events = Vec::new();
    match settings.auth.credential().map(String::from) {
        None => doc.credential_relay = None,
        Some(name) => {
            let endpoint = settings.endpoint();
            let was_attached = current.credential.is_some()
                && current.credential_relay.is_some()
                && current.credential_relay == endpoint_of(current);
            if patch.names("credential") {
                if doc.credential_relay.as_deref() != Some(&endpoint) || !was_attached {
                    events.push(SettingsEvent::CredentialAttached { credential: name, relay: endpoint.clone() });
                }
                doc.credential_relay = Some(endpoint);
            } else if doc.credential_relay.as_deref() != Some(&endpoint) {
                notices.push(format!(
                    "the stored credential '{name}' is detached: it was confirmed for {}, and the relay is now {endpoint}. \
                     It is not sent until you confirm it for this relay: panel smtp set --credential {name}",
                    doc.credential_relay.as_deref().unwrap_or("another relay")
                ));
                if was_attached {
                    let from = doc.credential_relay.clone().unwrap_or_default();
                    events.push(SettingsEvent::CredentialDetached { credential: name, from, to: endpoint });
                }
            }
        }
    }
    settings.credential_attached =
        settings.auth.credential().is_none() || doc.credential_relay.as_deref() == Some(settings.endpoint().as_str());
    settings.doc = doc.clone();
    Ok(Applied { doc, settings, notices, events })
}

/// Unsets the stored fields `unused` selects that the patch does not name, and says which.
fn drop_fields(
    doc: &mut SettingsDoc,
    patch: &SettingsDoc,
    unused: impl Fn(&&super::table::Setting) -> bool,
    because: &str,
    notices: &mut Vec<String>,
) {
    let dropped: Vec<&str> = SETTINGS
        .iter()
        .filter(&unused)
        .filter(|s| patch.get(s.name).is_none() && doc.get(s.name).is_some())
        .map(|s| s.name)
        .collect();
    for name in &dropped {
        doc.unset(name);
    }
    if !dropped.is_empty() {
        notices.push(format!("{} cleared: not used with {because}", dropped.join(", ")));
    }
}

/// The endpoint a stored (valid) document names, without validating the rest of it.
fn endpoint_of(doc: &SettingsDoc) -> Option<String> {
    let host = validate_host("host", doc.host.as_deref()?).ok()?;
    let (_, security) = modes(doc);
    let port = match doc.port {
        Some(p) => u16::try_from(p).ok()?,
        None => security.default_port(),
    };
    Some(endpoint_key(&host, port, security))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Auth;

    use crate::settings::example_doc as base;

    fn patch(pairs: &[(&str, &str)]) -> SettingsDoc {
        SettingsDoc::from_texts(pairs.iter().copied()).unwrap()
    }

    #[test]
    fn switching_security_to_none_drops_the_tls_fields_with_a_notice() {
        let current = SettingsDoc {
            security: Some("starttls".into()),
            ca_file: Some("/etc/panel/ca.pem".into()),
            pin_sha256: Some("ab".repeat(32)),
            tls_server_name: Some("relay.internal".into()),
            ..base()
        };
        let a = apply(&patch(&[("security", "none")]), &current).unwrap();
        assert_eq!((a.doc.ca_file, a.doc.pin_sha256, a.doc.tls_server_name), (None, None, None));
        assert_eq!(a.settings.security, Security::None);
        assert_eq!(a.notices, ["ca_file, pin_sha256, tls_server_name cleared: not used with security none"]);
        // Naming a TLS field together with none is still refused: the admin asked for both.
        let err = apply(&patch(&[("security", "none"), ("ca_file", "/ca.pem")]), &current).unwrap_err();
        assert_eq!(err.0[0].field, "security");
    }

    #[test]
    fn switching_auth_drops_the_old_modes_fields() {
        let current = SettingsDoc {
            auth: Some("password".into()),
            username: Some("panel".into()),
            password_env: Some("PW".into()),
            ..base()
        };
        let a = apply(&patch(&[("auth", "integrated")]), &current).unwrap();
        assert_eq!((a.doc.username, a.doc.password_env), (None, None));
        assert_eq!(a.settings.auth, Auth::Integrated { keytab: None, principal: None, service_principal: None });
        assert_eq!(a.notices, ["username, password_env cleared: not used with auth integrated"]);
        // The same mode again drops nothing.
        let same = apply(&patch(&[("auth", "password")]), &current).unwrap();
        assert_eq!(same.doc, current);
        assert!(same.notices.is_empty());
    }

    #[test]
    fn the_named_password_source_replaces_the_other() {
        let current = SettingsDoc {
            auth: Some("password".into()),
            username: Some("panel".into()),
            password_file: Some("/etc/panel/pw".into()),
            ..base()
        };
        let a = apply(&patch(&[("credential", "relay")]), &current).unwrap();
        assert_eq!((a.doc.username.as_deref(), a.doc.password_file.as_deref()), (None, None));
        assert_eq!(a.settings.auth, Auth::Stored { credential: "relay".into() });
        assert!(a.settings.credential_attached);
        let back = apply(&patch(&[("username", "panel"), ("password_env", "PW")]), &a.doc).unwrap();
        assert_eq!(back.doc.credential, None);
        assert_eq!(back.doc.credential_relay, None, "no credential, no binding");
    }

    #[test]
    fn a_credential_is_bound_to_its_relay_and_detached_when_the_relay_changes() {
        let current = base();
        let named = apply(&patch(&[("auth", "password"), ("credential", "relay")]), &current).unwrap();
        assert_eq!(named.doc.credential_relay.as_deref(), Some("relay.example.org:587/starttls"));
        assert_eq!(
            named.events,
            [SettingsEvent::CredentialAttached {
                credential: "relay".into(),
                relay: "relay.example.org:587/starttls".into()
            }]
        );
        let moved = apply(&patch(&[("host", "evil.example.net")]), &named.doc).unwrap();
        assert!(!moved.settings.credential_attached);
        assert!(moved.notices[0].contains("detached"), "{:?}", moved.notices);
        assert_eq!(
            moved.events,
            [SettingsEvent::CredentialDetached {
                credential: "relay".into(),
                from: "relay.example.org:587/starttls".into(),
                to: "evil.example.net:587/starttls".into(),
            }]
        );
        // Moving again while detached tells the admin again but records no second detach.
        let again = apply(&patch(&[("port", "2525")]), &moved.doc).unwrap();
        assert!(again.events.is_empty() && !again.notices.is_empty());
        // Naming it again attaches it to the new relay.
        let confirmed = apply(&patch(&[("credential", "relay")]), &again.doc).unwrap();
        assert!(confirmed.settings.credential_attached);
        assert_eq!(confirmed.doc.credential_relay.as_deref(), Some("evil.example.net:2525/starttls"));
    }

    #[test]
    fn an_invalid_result_reports_every_field_and_applies_nothing() {
        let err = apply(&patch(&[("port", "70000"), ("from", "nobody"), ("security", "ssl")]), &base()).unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["security", "port", "from"]);
    }
}
