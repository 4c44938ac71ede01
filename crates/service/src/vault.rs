//! Stored credentials: sealed with the master key from the key file, stored only while a
//! license grants `credential-storage`, opened only while one still does.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use panel_domain::credential::{CREDENTIAL_STORAGE, validate_name};
use panel_domain::errors::check_header_safe;
use panel_domain::{CredentialKind, FieldError, FieldErrors, RelaySettings, Secret};
use panel_relay::oauth::{AppCertificate, ServiceAccountKey};
use panel_store::{AuditEvent, CredentialRow, DeleteOutcome, NewCredential, PutOutcome, Rewrapped, StoreError};
use panel_vault::{AuthorityPublicKey, KeyFileError, Keyring, Sealed, envelope};
use serde::Serialize;

use crate::error::OpsError;
use crate::licensing::Grant;
use crate::ops::Panel;

/// Largest secret accepted (a Google service account key is about 2.4 KB).
const MAX_SECRET: usize = 64 * 1024;

/// What this installation trusts and where its master key lives; from the config file and
/// environment only, never from the API or the database.
pub struct SecretsConfig {
    pub authorities: Vec<AuthorityPublicKey>,
    pub master_key_file: PathBuf,
}

pub(crate) struct Secrets {
    /// The trusted authorities, with a serial that a reload of the config file bumps (the
    /// worker rebuilds its relay when it changes, so a license is judged by the new trust).
    pub(crate) authorities: RwLock<(u64, Arc<Vec<AuthorityPublicKey>>)>,
    master_key_file: PathBuf,
    keyring: Mutex<Option<Arc<Keyring>>>,
}

impl Secrets {
    pub(crate) fn new(config: SecretsConfig) -> Secrets {
        Secrets {
            authorities: RwLock::new((0, Arc::new(config.authorities))),
            master_key_file: config.master_key_file,
            keyring: Mutex::new(None),
        }
    }
}

/// A credential as listed: never the secret.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct CredentialInfo {
    pub name: String,
    pub kind: String,
    pub username: String,
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
    pub first_used_at: Option<DateTime<Utc>>,
    /// Where it is referenced: `relay settings` (or `relay settings (detached)`).
    pub used_by: Vec<String>,
}

/// A credential to store. `username` is the relay user, or the client id for Microsoft;
/// Google's comes from the key file.
pub struct CredentialInput {
    pub name: String,
    pub kind: CredentialKind,
    pub username: Option<String>,
    pub tenant: Option<String>,
    pub secret: Secret,
}

fn sealed(row: &CredentialRow) -> Sealed {
    Sealed {
        master_key_id: row.master_key_id.clone(),
        wrapped_key: row.wrapped_key.clone(),
        ciphertext: row.ciphertext.clone(),
    }
}

/// A vault problem in Panel's own words (a typed cause converts with `?` instead).
fn vault_error(why: impl Into<String>) -> OpsError {
    OpsError::Vault(why.into())
}

impl Panel {
    pub fn master_key_file(&self) -> &std::path::Path {
        &self.secrets.master_key_file
    }

    /// At service start: loads the master key file (creating it on first run, when nothing is
    /// encrypted yet) and proves that it opens every stored credential. Returns the key id.
    pub async fn open_vault(&self) -> Result<String, OpsError> {
        let path = &self.secrets.master_key_file;
        let rows = self.store.credentials().await?;
        let ring = match Keyring::load(path)? {
            Some(ring) => ring,
            None if rows.is_empty() => match Keyring::create(path) {
                Ok(ring) => {
                    tracing::info!(file = %path.display(), key = ring.current().id(), "created a new master key file");
                    ring
                }
                // Another process starting at the same moment created it: use theirs.
                Err(KeyFileError::Exists { .. }) => Keyring::load(path)?
                    .ok_or_else(|| vault_error(format!("{} vanished while starting", path.display())))?,
                Err(e) => return Err(e.into()),
            },
            None => {
                return Err(OpsError::Vault(format!(
                    "the master key file {} does not exist, but {} stored credential(s) were encrypted with master key {}; \
                     restore that file (or point PANEL_MASTER_KEY_FILE at it). Panel does not create a new key while \
                     credentials exist: they could never be decrypted with it",
                    path.display(),
                    rows.len(),
                    rows[0].master_key_id
                )));
            }
        };
        for row in &rows {
            let key = ring.find(&row.master_key_id).ok_or_else(|| panel_vault::VaultError::UnknownMasterKey {
                credential: row.name.clone(),
                expected: row.master_key_id.clone(),
                available: ring.ids().join(", "),
            })?;
            envelope::open(key, &row.id, &sealed(row))?;
        }
        let current = ring.current().id().to_string();
        if rows.is_empty() && self.store.current_master_key_id().await?.as_deref() != Some(&current) {
            self.store.adopt_master_key_id(&current).await?;
        }
        *self.secrets.keyring.lock().expect("not poisoned") = Some(Arc::new(ring));
        Ok(current)
    }

    /// The key ring holding `id` (re-reading the file after a rotation elsewhere), or the
    /// file's current key ring when `id` is `None`.
    fn keyring(&self, id: Option<&str>) -> Result<Arc<Keyring>, OpsError> {
        if let Some(id) = id
            && let Some(ring) = self.secrets.keyring.lock().expect("not poisoned").clone()
            && ring.find(id).is_some()
        {
            return Ok(ring);
        }
        let path = &self.secrets.master_key_file;
        let ring = Keyring::load(path)?.ok_or_else(|| {
            OpsError::Vault(format!(
                "the master key file {} does not exist; start the Panel Service once to create it, or restore it",
                path.display()
            ))
        })?;
        if let Some(id) = id
            && ring.find(id).is_none()
        {
            return Err(vault_error(format!(
                "master key {id} is not in {} (it holds {}); restore the key file that belongs to this database",
                path.display(),
                ring.ids().join(", ")
            )));
        }
        let ring = Arc::new(ring);
        *self.secrets.keyring.lock().expect("not poisoned") = Some(ring.clone());
        Ok(ring)
    }

    /// Fails unless a valid license grants `credential-storage`.
    async fn require_credential_storage(&self) -> Result<(), OpsError> {
        match self.grant(CREDENTIAL_STORAGE).await? {
            Grant::Yes { .. } => Ok(()),
            Grant::No(why) => Err(OpsError::License(format!("storing credentials is not licensed: {why}"))),
        }
    }

    /// Stores or replaces a credential. Checks the license first: without it nothing is written.
    pub async fn set_credential(&self, input: CredentialInput, by: &str) -> Result<PutOutcome, OpsError> {
        let (username, attributes) = validate_input(&input)?;
        self.require_credential_storage().await?;
        if self.secrets.keyring.lock().expect("not poisoned").is_none() {
            self.open_vault().await?;
        }
        let existing = self.store.credential(&input.name).await?;
        let id = existing.map(|c| c.id).unwrap_or_else(|| format!("cred_{}", hex_id()));
        // The file's current key, re-read each time: a rotation may have happened elsewhere.
        for _ in 0..3 {
            let ring = self.keyring(None)?;
            let sealed = envelope::seal(ring.current(), &id, input.secret.expose().as_bytes());
            let new = NewCredential {
                id: id.clone(),
                name: input.name.clone(),
                kind: input.kind.as_str().into(),
                username: username.clone(),
                attributes: attributes.clone(),
                master_key_id: sealed.master_key_id,
                wrapped_key: sealed.wrapped_key,
                ciphertext: sealed.ciphertext,
            };
            match self.store.put_credential(&new, by, self.now()).await {
                Err(StoreError::MasterKeyChanged { .. }) => continue,
                Err(e) => return Err(e.into()),
                Ok(outcome) => {
                    self.wake_workers().await;
                    return Ok(outcome);
                }
            }
        }
        Err(OpsError::Vault("the master key kept changing while storing; try again".into()))
    }

    pub async fn credentials(&self) -> Result<Vec<CredentialInfo>, OpsError> {
        // One read of the settings: which routes name each credential, and whether attached.
        let settings = match self.store.current_settings().await? {
            Some(stored) => RelaySettings::validate(&stored.doc).ok(),
            None => None,
        };
        let rows = self.store.credentials().await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let used_by = settings
                    .iter()
                    .flat_map(|s| s.routes())
                    .filter(|(_, route)| route.auth.credential() == Some(r.name.as_str()))
                    .map(|(name, route)| {
                        let what = match name {
                            panel_domain::PRIMARY => "relay settings".to_string(),
                            standby => format!("route {standby}"),
                        };
                        if route.credential_attached { what } else { format!("{what} (detached)") }
                    })
                    .collect();
                CredentialInfo {
                    name: r.name,
                    kind: r.kind,
                    username: r.username,
                    attributes: r.attributes,
                    created_at: r.created_at,
                    created_by: r.created_by,
                    updated_at: r.updated_at,
                    updated_by: r.updated_by,
                    first_used_at: r.first_used_at,
                    used_by,
                }
            })
            .collect())
    }

    pub async fn delete_credential(&self, name: &str, by: &str) -> Result<(), OpsError> {
        match self.store.delete_credential(name, by, self.now()).await? {
            DeleteOutcome::Deleted => Ok(()),
            DeleteOutcome::NotFound => Err(OpsError::NotFoundNamed { what: "credential", name: name.into() }),
            DeleteOutcome::InUse => Err(OpsError::Invalid(FieldErrors(vec![FieldError::new(
                "credential",
                format!(
                    "'{name}' is used by the relay settings; switch them to another credential or auth mode first \
                     (panel smtp set --auth none, or --credential OTHER)"
                ),
            )]))),
        }
    }

    /// Generates a new master key and re-wraps every data key with it, while services run:
    /// the key file keeps the old key until every row is moved, so any process can open any
    /// row at any moment. Returns (old key ids, new key id, credentials re-wrapped).
    pub async fn rotate_master_key(&self, by: &str) -> Result<(Vec<String>, String, u64), OpsError> {
        self.open_vault().await?;
        let path = self.secrets.master_key_file.clone();
        let mut ring = Keyring::load(&path)?.ok_or_else(|| vault_error("the master key file vanished"))?;
        let old: Vec<String> = ring.ids().into_iter().map(String::from).collect();
        let new_id = ring.begin_rotation()?.id().to_string();
        let mut moved = 0;
        let mut done = false;
        for _ in 0..5 {
            let rows = self.store.credentials().await?;
            let mut updates = Vec::new();
            for row in rows.iter().filter(|r| r.master_key_id != new_id) {
                let old_key = ring.find(&row.master_key_id).ok_or_else(|| {
                    vault_error(format!(
                        "credential {} uses master key {}, which is not in {}",
                        row.name,
                        row.master_key_id,
                        path.display()
                    ))
                })?;
                let new_key = ring.current();
                let rewrapped = envelope::rewrap(old_key, new_key, &row.id, &sealed(row))?;
                updates.push(Rewrapped {
                    id: row.id.clone(),
                    old_master_key_id: row.master_key_id.clone(),
                    master_key_id: rewrapped.master_key_id,
                    wrapped_key: rewrapped.wrapped_key,
                });
            }
            let event = AuditEvent::new(
                "master_key.rotated",
                &new_id,
                format!("from {}; {} credential(s) re-wrapped", old.join(","), updates.len()),
            );
            match self.store.rewrap_credentials(&updates, &new_id, by, self.now(), &event).await {
                Ok(n) => {
                    moved = n;
                    done = true;
                    break;
                }
                Err(StoreError::MasterKeyChanged { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if !done {
            return Err(OpsError::Vault(
                "credentials kept changing during the rotation; the key file holds both keys, run the rotation again"
                    .into(),
            ));
        }
        ring.finish_rotation()?;
        *self.secrets.keyring.lock().expect("not poisoned") = None;
        self.wake_workers().await;
        Ok((old, new_id, moved))
    }

    /// Opens a stored credential for sending: license, existence, kind and decryption checked.
    /// Errors are for the message log and never contain the secret.
    pub(crate) async fn open_credential(
        &self,
        name: &str,
        kinds: &[CredentialKind],
    ) -> Result<(CredentialRow, Secret), String> {
        match self.grant(CREDENTIAL_STORAGE).await.map_err(|e| e.to_string())? {
            Grant::Yes { .. } => {}
            Grant::No(why) => return Err(format!("the stored credential '{name}' cannot be used: {why}")),
        }
        let row = self.store.credential(name).await.map_err(|e| e.to_string())?.ok_or_else(|| {
            format!("the stored credential '{name}' does not exist; store it with panel credential set {name}")
        })?;
        if !kinds.iter().any(|k| row.kind == k.as_str()) {
            return Err(format!(
                "the stored credential '{name}' is a {} credential, but these settings need {}",
                row.kind,
                CredentialKind::either(kinds)
            ));
        }
        let ring = self.keyring(Some(&row.master_key_id)).map_err(|e| e.to_string())?;
        let key = ring.find(&row.master_key_id).expect("keyring() returns a ring holding the id");
        let plain = envelope::open(key, &row.id, &sealed(&row)).map_err(|e| e.to_string())?;
        let text = String::from_utf8(plain.to_vec())
            .map_err(|_| format!("the stored credential '{name}' is not valid UTF-8; store it again"))?;
        Ok((row, Secret::new(text)))
    }
}

fn hex_id() -> String {
    format!("{:032x}", crate::random_u128())[..16].to_string()
}

/// Checks a credential before anything is stored; returns the username and the attributes.
fn validate_input(input: &CredentialInput) -> Result<(String, serde_json::Map<String, serde_json::Value>), OpsError> {
    let mut errors = FieldErrors::default();
    errors.take(validate_name("name", &input.name));
    if input.secret.is_empty() {
        errors.push("secret", "is empty; give it on standard input (--password-stdin)");
    } else if input.secret.expose().len() > MAX_SECRET {
        errors.push("secret", format!("is longer than {MAX_SECRET} bytes"));
    }
    let mut attributes = serde_json::Map::new();
    let required = |errors: &mut FieldErrors, field: &str, value: &Option<String>, what: &str| -> Option<String> {
        match value.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
            None => {
                errors.push(field, format!("is required for a {} credential: {what}", input.kind));
                None
            }
            Some(v) => errors.take(check_header_safe(field, v).map(|_| v.to_string())),
        }
    };
    let username = match input.kind {
        CredentialKind::Password => {
            required(&mut errors, "username", &input.username, "the relay account (--username)")
        }
        CredentialKind::MicrosoftClientSecret | CredentialKind::MicrosoftCertificate => {
            if let Some(t) =
                required(&mut errors, "tenant", &input.tenant, "the directory (tenant) id or domain (--tenant)")
            {
                attributes.insert("tenant".into(), t.into());
            }
            if input.kind == CredentialKind::MicrosoftCertificate && !input.secret.is_empty() {
                // Checked now, not at the first token request: the key, the certificate, and
                // that they belong together. The thumbprint is what the app registration lists.
                match AppCertificate::parse(input.secret.expose().as_bytes()) {
                    Ok(c) => {
                        attributes.insert("thumbprint_sha256".into(), c.thumbprint_hex().into());
                    }
                    Err(e) => errors.push("secret", e),
                }
            }
            required(&mut errors, "username", &input.username, "the application (client) id (--client-id)")
        }
        CredentialKind::GoogleServiceAccount => match ServiceAccountKey::parse(input.secret.expose().as_bytes()) {
            Ok(key) => {
                if let Some(uri) = key.token_uri {
                    attributes.insert("token_uri".into(), uri.into());
                }
                Some(key.client_email)
            }
            Err(e) => {
                errors.push("secret", e);
                None
            }
        },
    };
    match username {
        Some(u) if errors.is_empty() => Ok((u, attributes)),
        _ => Err(OpsError::Invalid(errors)),
    }
}
