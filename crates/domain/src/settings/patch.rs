//! The patch rules: how a change to the relay settings becomes the next stored document. Pure:
//! `apply(patch, current)` gives the document to store, the validated settings, what the admin
//! must be told, and what the audit log records. The one validation of a save runs here.

use super::table::{SETTINGS, SettingsDoc, modes};
use super::{AuthMode, MAX_STANDBY, RelaySettings, RouteDoc, Security, Transport, route_doc, route_part};
use crate::errors::FieldErrors;

/// A saved change, before it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub doc: SettingsDoc,
    pub settings: RelaySettings,
    /// What the admin must know: dropped fields, a detached credential.
    pub notices: Vec<String>,
    /// What the save changes, field by field (`port: 587 -> 2525`), for the audit log; empty
    /// when it changes nothing.
    pub changes: Vec<String>,
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

/// Who saves a change: the local CLI (and the config file) on the service's machine, or the API
/// and the web UI, which anyone holding an admin token or session reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Local,
    Remote,
}

/// Applies `patch` to `current`:
/// - a field the patch names replaces the stored one, `''` clears it;
/// - naming a mode (`auth`, `security`) drops the stored fields that mode does not use (the
///   table's `uses`), unless the patch names them too, with a notice;
/// - naming one password source replaces the other kind (`credential` vs. a file or variable);
/// - a stored credential is bound to the relay endpoint it was named for: changing the host,
///   port, security or token endpoint detaches it (a notice and an audit event) until it is
///   named again;
/// - through the `Remote` channel, the settings that make the service read a local file or
///   variable and send it are refused (`check_channel`).
///
/// Every problem of the result is reported at once; nothing is applied on error.
pub fn apply(patch: &SettingsDoc, current: &SettingsDoc, channel: Channel) -> Result<Applied, FieldErrors> {
    if patch.routes.is_some() {
        let mut errors = FieldErrors::default();
        errors.push(
            "routes",
            "standby routes are changed one at a time: panel smtp set --route NAME ... \
             (PUT /api/v1/settings/smtp/routes/NAME), removed with panel smtp remove-route NAME",
        );
        return Err(errors);
    }
    let mut doc = current.merged(patch);
    let mut notices = Vec::new();
    let m = modes(&doc);
    if patch.names("transport") && Transport::parse(patch.transport.as_deref().unwrap_or_default()).is_some() {
        let unused = |s: &&super::table::Setting| !s.uses.used(m);
        drop_fields(&mut doc, patch, unused, &format!("transport {}", m.transport), &mut notices);
    }
    if patch.names("auth") && AuthMode::parse(patch.auth.as_deref().unwrap_or_default()).is_some() {
        let unused = |s: &&super::table::Setting| !s.uses.auth_uses(m.auth);
        drop_fields(&mut doc, patch, unused, &format!("auth {}", m.auth), &mut notices);
    }
    if patch.names("security") && Security::parse(patch.security.as_deref().unwrap_or_default()).is_some() {
        let unused = |s: &&super::table::Setting| !s.uses.security_uses(m.security);
        drop_fields(&mut doc, patch, unused, &format!("security {}", m.security), &mut notices);
    }
    if patch.names("recipient_policy")
        && crate::policy::PolicyMode::parse(patch.recipient_policy.as_deref().unwrap_or_default()).is_some()
    {
        let unused = |s: &&super::table::Setting| !s.uses.policy_uses(m.policy);
        drop_fields(&mut doc, patch, unused, &format!("recipient_policy {}", m.policy), &mut notices);
    }
    // One password source at a time: the one the patch names wins.
    if m.auth == AuthMode::Password && patch.names("credential") {
        let external = |s: &&super::table::Setting| matches!(s.name, "username" | "password_file" | "password_env");
        drop_fields(&mut doc, patch, external, "a stored credential", &mut notices);
    }
    if patch.names("password_file") || patch.names("password_env") {
        let stored = |s: &&super::table::Setting| s.name == "credential";
        drop_fields(&mut doc, patch, stored, "a password kept outside Panel", &mut notices);
    }

    let mut settings = RelaySettings::validate(&doc)?;
    // Where the stored settings send secrets now, validated once for both uses below.
    let was = endpoint_of(current);
    if channel == Channel::Remote {
        let mut errors = FieldErrors::default();
        check_channel(patch, current, was.as_deref(), &settings, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
    }
    let mut events = Vec::new();
    match settings.auth.credential().map(String::from) {
        None => doc.credential_relay = None,
        Some(name) => {
            let endpoint = settings.endpoint();
            let was_attached =
                current.credential.is_some() && current.credential_relay.is_some() && current.credential_relay == was;
            if patch.names("credential") {
                if doc.credential_relay.as_deref() != Some(&endpoint) || !was_attached {
                    events.push(SettingsEvent::CredentialAttached { credential: name, relay: endpoint.clone() });
                }
                doc.credential_relay = Some(endpoint);
            } else if doc.credential_relay.as_deref() != Some(&endpoint) {
                notices.push(detached_notice(&name, doc.credential_relay.as_deref(), &endpoint));
                if was_attached {
                    let from = doc.credential_relay.clone().unwrap_or_default();
                    events.push(SettingsEvent::CredentialDetached { credential: name, from, to: endpoint });
                }
            }
        }
    }
    settings.credential_attached = settings.bound_to(doc.credential_relay.as_deref());
    settings.doc = doc.clone();
    let changes = diff(current, &doc);
    Ok(Applied { doc, settings, notices, changes, events })
}

/// Applies `patch` to the standby route `name`, which is made (and tried after the others)
/// when it does not exist yet. The route's document is the installation-wide settings with
/// the route's own, so every rule of `apply` holds for it as for the primary: mode switches
/// drop fields, its credential is bound to its own relay, the remote channel may not name a
/// local file. A patch may name only per-route settings.
pub fn apply_route(
    name: &str,
    patch: &SettingsDoc,
    current: &SettingsDoc,
    channel: Channel,
) -> Result<Applied, FieldErrors> {
    let mut errors = FieldErrors::default();
    errors.take(super::check_route_name("route", name));
    if patch.routes.is_some() {
        errors.push("routes", "name one route's settings, not a list of routes");
    }
    for s in SETTINGS.iter().filter(|s| s.whole && patch.get(s.name).is_some()) {
        errors.push(s.name, "belongs to the whole installation, not to one route; set it without --route");
    }
    if current.host.is_none() && current.transport.is_none() {
        errors.push(
            "route",
            "save the main settings first (panel smtp set --host ... --from ... --fallback-recipient ...); \
             a standby route is tried after them",
        );
    }
    let mut routes = current.routes.clone().unwrap_or_default();
    let at = routes.iter().position(|r| r.name == name);
    if at.is_none() && routes.len() >= MAX_STANDBY {
        errors.push("route", format!("there are {MAX_STANDBY} standby routes already; remove one first"));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let own = at.map(|i| routes[i].settings.clone()).unwrap_or_default();
    let applied = apply(patch, &route_doc(current, &own), channel)?;
    let part = route_part(&applied.doc);
    let mut changes: Vec<String> = applied.changes.iter().map(|c| format!("route {name}: {c}")).collect();
    match at {
        Some(i) => routes[i].settings = part,
        None => {
            changes.insert(0, format!("route {name} added"));
            routes.push(RouteDoc { name: name.to_string(), settings: part });
        }
    }
    let doc = SettingsDoc { routes: Some(routes), ..current.clone() };
    let settings = RelaySettings::validate(&doc)?;
    let notices = applied.notices.into_iter().map(|n| format!("route {name}: {n}")).collect();
    Ok(Applied { doc, settings, notices, changes, events: applied.events })
}

/// Removes the standby route `name`; the routes after it move up.
pub fn remove_route(name: &str, current: &SettingsDoc) -> Result<Applied, FieldErrors> {
    let mut routes = current.routes.clone().unwrap_or_default();
    let Some(at) = routes.iter().position(|r| r.name == name) else {
        let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        let mut errors = FieldErrors::default();
        errors.push(
            "route",
            match names.is_empty() {
                true => format!("there is no standby route '{name}'; there are none"),
                false => format!("there is no standby route '{name}'; there are: {}", names.join(", ")),
            },
        );
        return Err(errors);
    };
    routes.remove(at);
    let doc = SettingsDoc { routes: if routes.is_empty() { None } else { Some(routes) }, ..current.clone() };
    let settings = RelaySettings::validate(&doc)?;
    Ok(Applied {
        doc,
        settings,
        notices: Vec::new(),
        changes: vec![format!("route {name} removed")],
        events: Vec::new(),
    })
}

/// Makes an earlier version the next one, exactly as it was stored: every field, and the
/// credential's binding as it stood then (a binding an admin confirmed for that version's
/// relay; a credential that was detached then stays detached). Validated by today's rules, and
/// through the `Remote` channel refused where a save naming those fields would be: a password
/// file or variable the API may not set, or a relay move while the password comes from one.
pub fn restore(target: &SettingsDoc, current: &SettingsDoc, channel: Channel) -> Result<Applied, FieldErrors> {
    let doc = target.clone();
    let mut settings = RelaySettings::validate(&doc)?;
    if channel == Channel::Remote {
        let mut errors = FieldErrors::default();
        check_channel(target, current, endpoint_of(current).as_deref(), &settings, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
    }
    settings.credential_attached = settings.bound_to(doc.credential_relay.as_deref());
    let mut notices = Vec::new();
    let mut events = Vec::new();
    if let Some(name) = settings.auth.credential().map(String::from) {
        let endpoint = settings.endpoint();
        // Already in force for this relay: nothing is attached anew.
        let was_bound = current.credential.as_deref() == Some(name.as_str())
            && current.credential_relay.as_deref() == Some(endpoint.as_str())
            && endpoint_of(current).as_deref() == Some(endpoint.as_str());
        if !settings.credential_attached {
            notices.push(detached_notice(&name, doc.credential_relay.as_deref(), &endpoint));
        } else if !was_bound {
            events.push(SettingsEvent::CredentialAttached { credential: name, relay: endpoint });
        }
    }
    settings.doc = doc.clone();
    let changes = diff(current, &doc);
    Ok(Applied { doc, settings, notices, changes, events })
}

/// What an admin is told when a stored credential is no longer sent because the relay moved.
fn detached_notice(name: &str, confirmed_for: Option<&str>, endpoint: &str) -> String {
    format!(
        "the stored credential '{name}' is detached: it was confirmed for {}, and the relay is now {endpoint}. \
         It is not sent until you confirm it for this relay: panel smtp set --credential {name}",
        confirmed_for.unwrap_or("another relay")
    )
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

/// Where a stored document sends its secrets (`RelaySettings::endpoint`); `None` before the
/// first save.
fn endpoint_of(doc: &SettingsDoc) -> Option<String> {
    RelaySettings::validate(doc).ok().map(|s| s.endpoint())
}

/// Refuses what only someone on the service's machine may do. `password_file` names a file and
/// `password_env` a variable that the service reads and sends to the relay as its password:
/// through the API they would let a token holder read any file or variable Panel can (its own
/// master key) and send it to a relay of their choosing. So a remote patch may clear them but
/// not set or change them, and may not move the relay (or the token endpoint) while the password
/// comes from one of them.
fn check_channel(
    patch: &SettingsDoc,
    current: &SettingsDoc,
    was: Option<&str>,
    result: &RelaySettings,
    errors: &mut FieldErrors,
) {
    for s in SETTINGS.iter().filter(|s| s.local_only) {
        if patch.names(s.name) && patch.get(s.name) != current.get(s.name) {
            errors.push(
                s.name,
                format!(
                    "is set only on the service's machine (panel smtp set --{} ...): it names what the service \
                     reads and sends as the relay password; through the API or web UI use a stored credential",
                    super::table::flag_name(s)
                ),
            );
        }
    }
    if let (super::Auth::Password { .. }, Some(was)) = (&result.auth, was)
        && was != result.endpoint()
    {
        errors.push(
            "host",
            format!(
                "the relay password comes from a file or variable set on the service's machine, so the relay \
                 ({was}) is changed only there (panel smtp set), or switch to a stored credential"
            ),
        );
    }
}

/// What a save changes, field by field, for the audit log and the version history: `port: 587
/// -> 2525`. Settings hold no secret (a password is named by its file, variable or stored
/// credential, never given).
pub fn diff(old: &SettingsDoc, new: &SettingsDoc) -> Vec<String> {
    let shown = |v: Option<serde_json::Value>| match v {
        None => "(default)".to_string(),
        Some(serde_json::Value::String(s)) => s,
        Some(v) => v.to_string(),
    };
    let mut changed: Vec<String> = SETTINGS
        .iter()
        .filter(|s| old.get(s.name) != new.get(s.name))
        .map(|s| format!("{}: {} -> {}", s.name, shown(old.get(s.name)), shown(new.get(s.name))))
        .collect();
    if old.credential_relay != new.credential_relay && changed.is_empty() {
        changed.push("credential confirmed for this relay".into());
    }
    let (old_routes, new_routes) =
        (old.routes.as_deref().unwrap_or_default(), new.routes.as_deref().unwrap_or_default());
    for r in old_routes.iter().filter(|r| !new_routes.iter().any(|n| n.name == r.name)) {
        changed.push(format!("route {} removed", r.name));
    }
    for r in new_routes {
        match old_routes.iter().find(|o| o.name == r.name) {
            None => changed.push(format!("route {} added", r.name)),
            Some(o) => {
                changed.extend(diff(&o.settings, &r.settings).into_iter().map(|c| format!("route {}: {c}", r.name)))
            }
        }
    }
    let order = |routes: &[RouteDoc]| routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    let (kept_old, kept_new): (Vec<_>, Vec<_>) = (
        order(old_routes).into_iter().filter(|n| new_routes.iter().any(|r| &r.name == n)).collect(),
        order(new_routes).into_iter().filter(|n| old_routes.iter().any(|r| &r.name == n)).collect(),
    );
    if kept_old != kept_new {
        changed.push(format!("route order: {} -> {}", kept_old.join(", "), kept_new.join(", ")));
    }
    changed
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
        let a = apply(&patch(&[("security", "none")]), &current, Channel::Local).unwrap();
        assert_eq!((a.doc.ca_file, a.doc.pin_sha256, a.doc.tls_server_name), (None, None, None));
        assert_eq!(a.settings.security, Security::None);
        assert_eq!(a.notices, ["ca_file, pin_sha256, tls_server_name cleared: not used with security none"]);
        // Naming a TLS field together with none is still refused: the admin asked for both.
        let err = apply(&patch(&[("security", "none"), ("ca_file", "/ca.pem")]), &current, Channel::Local).unwrap_err();
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
        let a = apply(&patch(&[("auth", "integrated")]), &current, Channel::Local).unwrap();
        assert_eq!((a.doc.username, a.doc.password_env), (None, None));
        assert_eq!(a.settings.auth, Auth::Integrated { keytab: None, principal: None, service_principal: None });
        assert_eq!(a.notices, ["username, password_env cleared: not used with auth integrated"]);
        // The same mode again drops nothing.
        let same = apply(&patch(&[("auth", "password")]), &current, Channel::Local).unwrap();
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
        let a = apply(&patch(&[("credential", "relay")]), &current, Channel::Local).unwrap();
        assert_eq!((a.doc.username.as_deref(), a.doc.password_file.as_deref()), (None, None));
        assert_eq!(a.settings.auth, Auth::Stored { credential: "relay".into() });
        assert!(a.settings.credential_attached);
        let back = apply(&patch(&[("username", "panel"), ("password_env", "PW")]), &a.doc, Channel::Local).unwrap();
        assert_eq!(back.doc.credential, None);
        assert_eq!(back.doc.credential_relay, None, "no credential, no binding");
    }

    #[test]
    fn a_credential_is_bound_to_its_relay_and_detached_when_the_relay_changes() {
        let current = base();
        let named = apply(&patch(&[("auth", "password"), ("credential", "relay")]), &current, Channel::Local).unwrap();
        assert_eq!(named.doc.credential_relay.as_deref(), Some("relay.example.org:587/starttls"));
        assert_eq!(
            named.events,
            [SettingsEvent::CredentialAttached {
                credential: "relay".into(),
                relay: "relay.example.org:587/starttls".into()
            }]
        );
        let moved = apply(&patch(&[("host", "evil.example.net")]), &named.doc, Channel::Local).unwrap();
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
        let again = apply(&patch(&[("port", "2525")]), &moved.doc, Channel::Local).unwrap();
        assert!(again.events.is_empty() && !again.notices.is_empty());
        // Naming it again attaches it to the new relay.
        let confirmed = apply(&patch(&[("credential", "relay")]), &again.doc, Channel::Local).unwrap();
        assert!(confirmed.settings.credential_attached);
        assert_eq!(confirmed.doc.credential_relay.as_deref(), Some("evil.example.net:2525/starttls"));
    }

    #[test]
    fn changing_the_token_endpoint_detaches_the_client_secret() {
        let current = SettingsDoc {
            auth: Some("oauth2".into()),
            oauth_provider: Some("microsoft".into()),
            username: Some("panel@example.org".into()),
            ..base()
        };
        let named = apply(&patch(&[("credential", "m365")]), &current, Channel::Local).unwrap();
        assert!(named.settings.credential_attached);
        // The attack: only the endpoint the secret is posted to changes.
        let moved = apply(&patch(&[("token_endpoint", "https://idp.evil.example/token")]), &named.doc, Channel::Remote)
            .unwrap();
        assert!(!moved.settings.credential_attached, "the secret must not go to the new endpoint");
        assert!(moved.notices[0].contains("with token endpoint https://idp.evil.example/token"), "{:?}", moved.notices);
        assert!(matches!(&moved.events[..], [SettingsEvent::CredentialDetached { .. }]), "{:?}", moved.events);
        // Back to the provider's own endpoint: the binding it was confirmed for holds again.
        let back = apply(&patch(&[("token_endpoint", "")]), &moved.doc, Channel::Remote).unwrap();
        assert!(back.settings.credential_attached);
    }

    #[test]
    fn a_password_file_or_variable_is_set_only_on_the_services_machine() {
        let current = base();
        for (field, value) in [("password_file", "/var/lib/panel/master.key"), ("password_env", "PANEL_MASTER")] {
            let p = patch(&[("auth", "password"), ("username", "x"), (field, value), ("host", "evil.example.net")]);
            let err = apply(&p, &current, Channel::Remote).unwrap_err();
            assert_eq!(err.0.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), [field, "host"], "{err:?}");
            assert!(err.0[0].message.contains("stored credential"), "{err:?}");
            assert!(apply(&p, &current, Channel::Local).is_ok(), "the CLI on the machine may");
        }
        let local = apply(
            &patch(&[("auth", "password"), ("username", "x"), ("password_file", "/etc/panel/pw")]),
            &current,
            Channel::Local,
        )
        .unwrap()
        .doc;
        // The web form sends every field back unchanged: that is not a change.
        let same = patch(&[("password_file", "/etc/panel/pw"), ("from", "Panel <p@example.org>")]);
        assert!(apply(&same, &local, Channel::Remote).is_ok());
        // Moving the relay would send the local password to it: refused remotely, with the way.
        let err = apply(&patch(&[("host", "evil.example.net")]), &local, Channel::Remote).unwrap_err();
        assert_eq!(err.0[0].field, "host");
        assert!(err.0[0].message.contains("relay.example.org:587/starttls"), "{err:?}");
        assert!(apply(&patch(&[("port", "2525")]), &local, Channel::Remote).is_err());
        assert!(apply(&patch(&[("host", "relay2.example.org")]), &local, Channel::Local).is_ok());
        // Clearing it (for a stored credential) and moving in one remote save is allowed.
        let switched =
            apply(&patch(&[("credential", "relay"), ("host", "relay2.example.org")]), &local, Channel::Remote);
        assert_eq!(switched.unwrap().doc.password_file, None);
    }

    #[test]
    fn restoring_a_version_brings_back_its_fields_and_the_binding_it_had() {
        let v1 = apply(&patch(&[("auth", "password"), ("credential", "relay")]), &base(), Channel::Local).unwrap().doc;
        let v2 = apply(&patch(&[("host", "relay2.example.org"), ("port", "2525")]), &v1, Channel::Local).unwrap().doc;
        let back = restore(&v1, &v2, Channel::Remote).unwrap();
        assert_eq!(back.doc, v1);
        assert!(back.settings.credential_attached, "v1's relay is the one the credential was confirmed for");
        assert_eq!(back.changes, ["host: relay2.example.org -> relay.example.org", "port: 2525 -> (default)"]);
        assert!(matches!(&back.events[..], [SettingsEvent::CredentialAttached { .. }]), "{:?}", back.events);
        // v2 had the credential detached: restoring it does not attach it to relay2.
        let detached = restore(&v2, &back.doc, Channel::Remote).unwrap();
        assert!(!detached.settings.credential_attached);
        assert!(detached.notices[0].contains("detached"), "{:?}", detached.notices);
        assert!(detached.events.is_empty());
        // Restoring what is in force changes nothing.
        assert!(restore(&v1, &v1, Channel::Remote).unwrap().changes.is_empty());
        // A version whose password comes from a local file is restored only on the machine.
        let local = apply(
            &patch(&[("auth", "password"), ("username", "x"), ("password_file", "/etc/panel/pw")]),
            &v1,
            Channel::Local,
        )
        .unwrap()
        .doc;
        let err = restore(&local, &v1, Channel::Remote).unwrap_err();
        assert_eq!(err.0[0].field, "password_file", "{err:?}");
        assert!(restore(&local, &v1, Channel::Local).is_ok());
        // Back from it to the stored credential is a clear, which the API may do.
        assert!(restore(&v1, &local, Channel::Remote).is_ok());
    }

    #[test]
    fn a_save_says_what_it_changes_field_by_field() {
        let a = apply(&patch(&[("port", "2525"), ("security", "starttls")]), &base(), Channel::Local).unwrap();
        assert_eq!(a.changes, ["security: (default) -> starttls", "port: (default) -> 2525"], "in the table's order");
        assert!(apply(&patch(&[("port", "2525")]), &a.doc, Channel::Local).unwrap().changes.is_empty());
    }

    #[test]
    fn an_invalid_result_reports_every_field_and_applies_nothing() {
        let err = apply(&patch(&[("port", "70000"), ("from", "nobody"), ("security", "ssl")]), &base(), Channel::Local)
            .unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["security", "port", "from"]);
    }

    #[test]
    fn a_standby_route_holds_only_its_own_settings_and_shares_the_installations() {
        let a = apply_route(
            "standby",
            &patch(&[("host", "Backup.Example.org"), ("port", "2525"), ("security", "none")]),
            &base(),
            Channel::Local,
        )
        .unwrap();
        assert_eq!(a.changes[0], "route standby added");
        assert!(a.changes.contains(&"route standby: port: (default) -> 2525".to_string()), "{:?}", a.changes);
        let stored = &a.doc.routes.as_ref().unwrap()[0];
        assert_eq!((stored.name.as_str(), stored.settings.from.as_deref()), ("standby", None), "from is not copied");
        let standby = &a.settings.standby[0].settings;
        assert_eq!((standby.host.as_str(), standby.port), ("backup.example.org", 2525));
        assert_eq!(standby.from, a.settings.from, "the sender is the installation's");
        let names: Vec<_> = a.settings.routes().map(|(n, s)| (n, s.host.clone())).collect();
        assert_eq!(names, [("primary", "relay.example.org".into()), ("standby", "backup.example.org".into())]);
        // A main save keeps the routes; a change to the installation's sender reaches them.
        let main = apply(&patch(&[("from", "ops@example.org")]), &a.doc, Channel::Local).unwrap();
        assert_eq!(main.settings.standby[0].settings.from.to_string(), "ops@example.org");
        // Removing it leaves the primary alone.
        let removed = remove_route("standby", &main.doc).unwrap();
        assert_eq!((removed.doc.routes, removed.changes), (None, vec!["route standby removed".to_string()]));
    }

    #[test]
    fn a_route_patch_is_refused_with_every_reason_and_changes_nothing() {
        let err =
            apply_route("Primary!", &patch(&[("from", "x@example.org"), ("port", "2525")]), &base(), Channel::Local)
                .unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["route", "from"], "{err:?}");
        let err = apply_route("primary", &patch(&[("host", "b.example")]), &base(), Channel::Local).unwrap_err();
        assert!(err.0[0].message.contains("without --route"), "{err:?}");
        let err =
            apply_route("b", &patch(&[("host", "b.example")]), &SettingsDoc::default(), Channel::Local).unwrap_err();
        assert!(err.0[0].message.contains("main settings first"), "{err:?}");
        // A new route must name its relay; the route's problems are named as such.
        let err = apply_route("b", &patch(&[("port", "2525")]), &base(), Channel::Local).unwrap_err();
        assert_eq!(err.0[0].field, "host", "{err:?}");
        let err = remove_route("nope", &base()).unwrap_err();
        assert!(err.0[0].message.contains("there are none"), "{err:?}");
        let main = apply(&SettingsDoc { routes: Some(vec![]), ..SettingsDoc::default() }, &base(), Channel::Local);
        assert_eq!(main.unwrap_err().0[0].field, "routes");
        // A stored document whose route lost its relay names the route in the error.
        let mut doc = apply_route("b", &patch(&[("host", "b.example")]), &base(), Channel::Local).unwrap().doc;
        doc.routes.as_mut().unwrap()[0].settings.host = None;
        let err = RelaySettings::validate(&doc).unwrap_err();
        assert_eq!(err.0[0].field, "routes.b.host", "{err:?}");
    }

    #[test]
    fn each_route_binds_its_own_credential_to_its_own_relay() {
        let primary = apply(&patch(&[("auth", "password"), ("credential", "main")]), &base(), Channel::Local).unwrap();
        let a = apply_route(
            "standby",
            &patch(&[("host", "b.example"), ("auth", "password"), ("credential", "backup")]),
            &primary.doc,
            Channel::Remote,
        )
        .unwrap();
        assert!(a.settings.credential_attached && a.settings.standby[0].settings.credential_attached);
        assert_eq!(
            a.events,
            [SettingsEvent::CredentialAttached { credential: "backup".into(), relay: "b.example:587/starttls".into() }]
        );
        // Moving the standby detaches its credential, not the primary's.
        let moved = apply_route("standby", &patch(&[("host", "c.example")]), &a.doc, Channel::Local).unwrap();
        assert!(moved.settings.credential_attached && !moved.settings.standby[0].settings.credential_attached);
        assert!(moved.notices[0].starts_with("route standby: the stored credential 'backup' is detached"));
        // Through the API a route may not name a local password file either.
        let err = apply_route(
            "standby",
            &patch(&[("auth", "password"), ("username", "u"), ("password_file", "/etc/shadow")]),
            &a.doc,
            Channel::Remote,
        )
        .unwrap_err();
        assert_eq!(err.0[0].field, "password_file");
    }
}
