//! Local admin accounts (Argon2id password hashes), browser sessions with CSRF tokens, and API
//! tokens for scripts. Only SHA-256 digests of session and API tokens are stored.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use std::net::IpAddr;

use panel_domain::{FieldErrors, Secret};
use panel_store::{SignInReservation, TOKEN_ID_CHARS};

use crate::error::OpsError;
use crate::ops::Panel;
use crate::views::{Admin, ApiToken};

/// A browser session lasts this long after sign-in.
pub const SESSION_HOURS: i64 = 12;
pub const MIN_PASSWORD_CHARS: usize = 12;

panel_domain::string_enum!(
    /// What an account may do, least first: viewers read; operators also send tests, retry
    /// messages, run schedules and post events; admins do everything.
    Role { Viewer = "viewer", Operator = "operator", Admin = "admin" }
);

/// Who made a request.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub role: Role,
    /// Set for a browser session: state-changing requests must carry this token.
    pub csrf: Option<String>,
    /// What was current when the request was authenticated (`Panel::as_seen`).
    pub seen: crate::ops::Seen,
}

impl Actor {
    /// How the audit log names this actor.
    pub fn audit_name(&self) -> String {
        format!("admin:{}", self.name)
    }
}

fn actor(o: panel_store::TokenOwner, kept: Option<std::sync::Arc<crate::ops::Kept>>) -> Actor {
    Actor {
        name: o.admin,
        role: Role::parse(&o.role).unwrap_or(Role::Viewer),
        csrf: if o.kind == "session" { o.csrf } else { None },
        seen: crate::ops::Seen { settings: o.settings_version, definitions: o.definitions, kept },
    }
}

/// Why a request is refused for its role: the API's and the UI's words for a 403.
pub fn role_refusal(role: Role, needed: Role) -> String {
    format!("your role ({}) may not do this; it needs {}", role.as_str(), needed.as_str())
}

/// Failed sign-ins allowed within `SIGN_IN_WINDOW`: for one account from one address; from one
/// address over every name; and for one account from everywhere together (guessing spread over
/// many addresses). The last does not apply from an address the account signed in from before,
/// so nobody can lock an admin out of the address they use, nor one client lock out everyone
/// behind a proxy.
pub const SIGN_IN_MAX_FAILURES: i64 = 5;
pub const SIGN_IN_MAX_PER_ADDRESS: i64 = 20;
pub const SIGN_IN_MAX_PER_ACCOUNT: i64 = 50;
pub const SIGN_IN_WINDOW: chrono::Duration = chrono::Duration::minutes(15);

/// What a sign-in attempt came to.
pub enum SignIn {
    Accepted {
        session: Session,
        role: Role,
    },
    /// Wrong name or password.
    Refused,
    /// Too many failures; the password was not checked.
    Blocked {
        retry_after_secs: u64,
    },
}

pub struct Session {
    pub token: String,
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
}

/// The lockout's counters for one attempt, each with its limit: this account from this address,
/// this address over every name, and (unless the address is one the account signed in from
/// before) this account from everywhere. The first is the pair.
fn sign_in_keys(account: &str, address: &str, known: bool) -> Vec<(String, i64)> {
    let mut keys = vec![
        (format!("pair:{account}|{address}"), SIGN_IN_MAX_FAILURES),
        (format!("ip:{address}|"), SIGN_IN_MAX_PER_ADDRESS),
    ];
    if !known {
        keys.push((account_key(account), SIGN_IN_MAX_PER_ACCOUNT));
    }
    keys
}

/// The sign-in key of an account over every address (ends with `|` so that one name's key is
/// never a prefix of another's).
fn account_key(name: &str) -> String {
    format!("name:{}|", name.trim().to_ascii_lowercase())
}

/// An account's name and password as every way of making one checks them.
fn check_account(name: &str, password: &Secret) -> Result<(), OpsError> {
    let mut errors = FieldErrors::default();
    if let Err(e) = panel_automation::check_name(name) {
        errors.push("name", e);
    }
    if password.expose().chars().count() < MIN_PASSWORD_CHARS {
        errors.push("password", format!("must have at least {MIN_PASSWORD_CHARS} characters"));
    }
    if errors.is_empty() { Ok(()) } else { Err(OpsError::Invalid(errors)) }
}

fn random_token(prefix: &str) -> String {
    let bytes = crate::random_u128().to_le_bytes().into_iter().chain(crate::random_u128().to_le_bytes());
    format!("{prefix}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.collect::<Vec<u8>>()))
}

/// The stored form of a session or API token.
pub fn token_digest(token: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()))
}

fn hash_password(password: &Secret) -> String {
    let salt = SaltString::encode_b64(&crate::random_u128().to_le_bytes()).expect("16 bytes make a salt");
    Argon2::default().hash_password(password.expose().as_bytes(), &salt).expect("argon2 hashes").to_string()
}

/// The throwaway hash that unknown names are checked against, made once.
async fn dummy_hash() -> Result<String, OpsError> {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(d) = DUMMY.get() {
        return Ok(d.clone());
    }
    let made = blocking_hash(Secret::new(random_token(""))).await?;
    Ok(DUMMY.get_or_init(|| made).clone())
}

async fn blocking_hash(password: Secret) -> Result<String, OpsError> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| OpsError::internal("hashing the password", e))
}

fn verify_password(password: &Secret, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.expose().as_bytes(), &h).is_ok())
}

/// What a used, expired or wrong setup link is told.
pub const SETUP_LINK_SPENT: &str = "this setup link is used, expired or from another start of the service; \
     make the first admin with: panel admin create NAME --role admin (or restart panel serve for a new link)";

/// How long a setup link works when nobody uses it.
pub const SETUP_LINK_LIFETIME: chrono::Duration = chrono::Duration::hours(1);

/// The first-run setup link of one Panel Service: the digest of its token (the token itself is
/// printed once and kept nowhere) and when it stops working.
pub(crate) struct SetupLink {
    digest: String,
    expires: DateTime<Utc>,
}

impl Panel {
    /// On a service's first start with no admin account: a one-time token for the link that
    /// lets a person create the first admin in the browser. It works once, for an hour, and only
    /// while no account exists; `None` when one does.
    pub async fn open_setup(&self) -> Result<Option<String>, OpsError> {
        if !self.store.admins().await?.is_empty() {
            return Ok(None);
        }
        let token = random_token("");
        let link = SetupLink { digest: token_digest(&token), expires: self.now() + SETUP_LINK_LIFETIME };
        *self.setup.lock().expect("not poisoned") = Some(link);
        Ok(Some(token))
    }

    /// Whether `token` opens this service's setup page now.
    pub async fn setup_open(&self, token: &str) -> Result<bool, OpsError> {
        if !self.setup_token_valid(token) {
            return Ok(false);
        }
        if !self.store.admins().await?.is_empty() {
            // Made another way (`panel admin create`, another service's link): the link is done.
            *self.setup.lock().expect("not poisoned") = None;
            return Ok(false);
        }
        Ok(true)
    }

    fn setup_token_valid(&self, token: &str) -> bool {
        let guard = self.setup.lock().expect("not poisoned");
        let Some(link) = guard.as_ref() else { return false };
        // Digests are compared, not tokens: how long a comparison takes says nothing about the
        // token a guess would need.
        link.digest == token_digest(token) && self.now() < link.expires
    }

    /// The setup page's form: makes the first admin (role admin) and signs it in. The link is
    /// spent whatever the outcome, except bad input, which can be corrected on the same page.
    pub async fn finish_setup(
        &self,
        token: &str,
        name: &str,
        password: &Secret,
        client: Option<IpAddr>,
    ) -> Result<SignIn, OpsError> {
        if !self.setup_token_valid(token) {
            return Err(OpsError::Forbidden(SETUP_LINK_SPENT.into()));
        }
        let name = name.trim().to_ascii_lowercase();
        check_account(&name, password)?;
        let hash = blocking_hash(password.clone()).await?;
        *self.setup.lock().expect("not poisoned") = None;
        if !self.store.create_first_admin(&name, Role::Admin.as_str(), &hash, "setup link", self.now()).await? {
            return Err(OpsError::Conflict(
                "an admin account exists already; sign in with it, or make another with panel admin create".into(),
            ));
        }
        self.sign_in(&name, password, client).await
    }

    /// Creates an account, or with `replace` sets its role and password (ending its sessions).
    pub async fn put_admin(
        &self,
        name: &str,
        role: Role,
        password: &Secret,
        replace: bool,
        by: &str,
    ) -> Result<(), OpsError> {
        check_account(name, password)?;
        let hash = blocking_hash(password.clone()).await?;
        if !self.store.put_admin(name, role.as_str(), &hash, replace, by, self.now()).await? {
            return Err(OpsError::Conflict(format!(
                "an admin named '{name}' exists already; to change the password: panel admin set-password {name}"
            )));
        }
        Ok(())
    }

    pub async fn admins(&self) -> Result<Vec<Admin>, OpsError> {
        let since = self.now() - SIGN_IN_WINDOW;
        let mut out = Vec::new();
        for a in self.store.admins().await? {
            let (failed, oldest) = self.store.sign_in_count(&account_key(&a.name), since).await?;
            let locked_until = oldest.filter(|_| failed >= SIGN_IN_MAX_PER_ACCOUNT).map(|t| t + SIGN_IN_WINDOW);
            out.push(Admin {
                name: a.name,
                role: a.role,
                created_at: a.created_at,
                updated_at: a.updated_at,
                failed_sign_ins: failed,
                locked_until,
            });
        }
        Ok(out)
    }

    /// `panel admin unlock NAME`: forgets the account's counted wrong passwords, from every
    /// address; returns how many there were.
    pub async fn unlock_admin(&self, name: &str, by: &str) -> Result<u64, OpsError> {
        let name = name.trim().to_ascii_lowercase();
        if self.store.admin(&name).await?.is_none() {
            return Err(OpsError::NotFoundNamed { what: "admin", name });
        }
        let prefixes = [account_key(&name), format!("pair:{name}|")];
        Ok(self.store.clear_sign_in(&prefixes, &name, by, self.now()).await?)
    }

    pub async fn delete_admin(&self, name: &str, by: &str) -> Result<(), OpsError> {
        match self.store.delete_admin(name, by, self.now()).await? {
            true => Ok(()),
            false => Err(OpsError::NotFoundNamed { what: "admin", name: name.into() }),
        }
    }

    /// Checks a name and password from `client`, under the lockout: after `SIGN_IN_MAX_FAILURES`
    /// failures within `SIGN_IN_WINDOW` for the account name or the client address, attempts are
    /// refused unchecked. Each attempt is counted before the password is checked (the store
    /// reserves it atomically, for every service sharing the database), so parallel guesses
    /// cannot get more checks; a right password gives its reservation back. A mismatch says
    /// nothing more than `Refused`.
    pub async fn sign_in(&self, name: &str, password: &Secret, client: Option<IpAddr>) -> Result<SignIn, OpsError> {
        let now = self.now();
        let account = name.trim().to_ascii_lowercase();
        let address = client.map(|ip| ip.to_string()).unwrap_or_default();
        let known = self.store.is_known_client(&account, &address).await?;
        let keys = sign_in_keys(&account, &address, known);
        let pair = keys[0].0.clone();
        let reserved = match self.store.reserve_sign_in(&keys, now - SIGN_IN_WINDOW, now).await? {
            SignInReservation::Reserved(ids) => ids,
            SignInReservation::Blocked { oldest } => {
                let wait = (oldest + SIGN_IN_WINDOW - now).num_seconds().max(1);
                return Ok(SignIn::Blocked { retry_after_secs: wait as u64 });
            }
        };
        let Some((session, role)) = self.check_password(name, password).await? else { return Ok(SignIn::Refused) };
        self.store.forgive_sign_in(&reserved, &[pair, account_key(&account)], (&account, &address), now).await?;
        Ok(SignIn::Accepted { session, role })
    }

    /// Checks a name and password and opens a session; `None` for any mismatch.
    async fn check_password(&self, name: &str, password: &Secret) -> Result<Option<(Session, Role)>, OpsError> {
        let account = self.store.admin(name.trim()).await?;
        // Verify against a throwaway hash when the account does not exist, so timing does not tell.
        let hash = match &account {
            Some(a) => a.password_hash.clone(),
            None => dummy_hash().await?,
        };
        // Argon2 takes tens of milliseconds of CPU on purpose: off the async threads, so a
        // burst of sign-ins cannot stall the worker or the other requests.
        let password_copy = password.clone();
        let valid = tokio::task::spawn_blocking(move || verify_password(&password_copy, &hash))
            .await
            .map_err(|e| OpsError::internal("checking the password", e))?;
        let Some(account) = account.filter(|_| valid) else { return Ok(None) };
        let role = Role::parse(&account.role).unwrap_or(Role::Viewer);
        let session = Session {
            token: random_token("pns_"),
            csrf: random_token(""),
            expires_at: self.now() + chrono::Duration::hours(SESSION_HOURS),
        };
        self.store
            .add_token(
                &token_digest(&session.token),
                "session",
                &account.name,
                "web",
                Some(&session.csrf),
                Some(session.expires_at),
                self.now(),
            )
            .await?;
        Ok(Some((session, role)))
    }

    pub async fn sign_out(&self, token: &str) -> Result<(), OpsError> {
        Ok(self.store.delete_token(&token_digest(token)).await?)
    }

    /// The actor behind a session or API token, if it is valid.
    pub async fn authenticate(&self, token: &str) -> Result<Option<Actor>, OpsError> {
        let owner = self.store.token_owner(&token_digest(token), self.now()).await?;
        self.metrics.token_checked(false);
        Ok(owner.map(|o| actor(o, None)))
    }

    /// `authenticate`, for a request that sends one message and needs at least `needs`: on
    /// PostgreSQL from the token's owner as this service read it within the last minute
    /// (`Store::token_owner_kept`), without a read. Its message is then written only while the
    /// token, its owner's role and the relay settings are as that read found them; when they
    /// changed, the request reads its token again and is answered by that (`Panel::reauthorized`).
    pub async fn authenticate_kept(&self, token: &str, needs: Role) -> Result<Option<Actor>, OpsError> {
        let owner = self.store.token_owner_kept(&token_digest(token), self.now()).await?;
        match owner {
            // A kept owner whose role is too low may have been raised since: only a read refuses.
            Some((o, Some(fence))) if Role::parse(&o.role).is_some_and(|role| role >= needs) => {
                self.metrics.token_checked(true);
                Ok(Some(actor(o, Some(std::sync::Arc::new(crate::ops::Kept { fence, needs })))))
            }
            Some((_, Some(_))) => self.authenticate(token).await,
            owner => {
                self.metrics.token_checked(false);
                Ok(owner.map(|(o, _)| actor(o, None)))
            }
        }
    }

    /// A new API token for `admin` (shown once; only its digest is stored).
    pub async fn create_api_token(&self, admin: &str, label: &str) -> Result<String, OpsError> {
        if self.store.admin(admin).await?.is_none() {
            return Err(OpsError::NotFoundNamed { what: "admin", name: admin.into() });
        }
        let token = random_token("pnl_");
        self.store.add_token(&token_digest(&token), "token", admin, label, None, None, self.now()).await?;
        Ok(token)
    }

    /// API tokens (labels and use, never the tokens) of `admin`, or of every account.
    pub async fn api_tokens(&self, admin: Option<&str>) -> Result<Vec<ApiToken>, OpsError> {
        if let Some(name) = admin
            && self.store.admin(name).await?.is_none()
        {
            return Err(OpsError::NotFoundNamed { what: "admin", name: name.into() });
        }
        Ok(self.store.tokens(admin).await?.into_iter().map(Into::into).collect())
    }

    /// Revokes an API token by its id (from `api_tokens`); at once on every service, since every
    /// request looks its token up. Audited.
    pub async fn revoke_api_token(&self, id: &str, by: &str) -> Result<ApiToken, OpsError> {
        let id = id.trim().to_ascii_lowercase();
        if id.len() != TOKEN_ID_CHARS || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut errors = FieldErrors::default();
            errors.push(
                "id",
                format!("'{id}' is not a token id: {TOKEN_ID_CHARS} hex digits, as panel admin token list shows"),
            );
            return Err(OpsError::Invalid(errors));
        }
        match self.store.revoke_token(&id, by, self.now()).await? {
            Some(t) => Ok(t.into()),
            None => Err(OpsError::NotFoundNamed { what: "API token", name: id }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let pw = Secret::new("correct horse battery".into());
        let hash = hash_password(&pw);
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password(&pw, &hash));
        assert!(!verify_password(&Secret::new("wrong".into()), &hash));
        assert_ne!(hash, hash_password(&pw), "salted");
    }

    #[test]
    fn the_account_wide_lock_never_applies_from_an_address_the_account_signed_in_from() {
        let keys = |known| sign_in_keys("ann", "192.0.2.7", known).into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(keys(false), ["pair:ann|192.0.2.7", "ip:192.0.2.7|", "name:ann|"]);
        assert_eq!(
            keys(true),
            ["pair:ann|192.0.2.7", "ip:192.0.2.7|"],
            "a known address is not locked by others' guesses"
        );
        // No account's key is a prefix of another's (an unlock of "an" must not unlock "ann").
        assert!(!account_key("ann").starts_with(&account_key("an")));
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!(Role::parse("Operator"), Some(Role::Operator));
        assert_eq!(Role::parse("root"), None);
    }
}
