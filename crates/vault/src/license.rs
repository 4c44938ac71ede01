//! License keys: a JSON document signed with Ed25519 by a license authority.
//!
//! Text form: `panel-license-v1.<base64url(json)>.<base64url(signature)>`, the signature covering
//! everything before the last dot. Panel trusts only the authority public keys in its config
//! file or environment, so the admin who adds keys cannot also mint trust.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, NaiveDate, Utc};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub const LICENSE_PREFIX: &str = "panel-license-v1";
const PUBLIC_PREFIX: &str = "ed25519:";
const PRIVATE_PREFIX: &str = "panel-authority-key-v1:";

/// A trusted authority's public key, written `ed25519:<base64url>`.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthorityPublicKey([u8; 32]);

impl AuthorityPublicKey {
    pub fn parse(text: &str) -> Result<AuthorityPublicKey, String> {
        let t = text.trim();
        let body = t.strip_prefix(PUBLIC_PREFIX).ok_or_else(|| {
            format!("'{t}' is not a license authority public key (expected ed25519:<base64>, as in authority.pub)")
        })?;
        let bytes = URL_SAFE_NO_PAD.decode(body).map_err(|_| format!("'{t}': the key is not valid base64url"))?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| format!("'{t}': an Ed25519 public key has 32 bytes"))?;
        Ok(AuthorityPublicKey(key))
    }

    /// A short stable name for the authority, carried in every license it signs.
    pub fn id(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.0);
        hex::encode(&digest.as_ref()[..8])
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0).verify(message, signature).is_ok()
    }
}

impl fmt::Display for AuthorityPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for AuthorityPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthorityPublicKey({})", self.id())
    }
}

/// An authority's signing key. Its file form is `panel-authority-key-v1:<base64 PKCS#8>`.
pub struct AuthorityKeyPair {
    pair: Ed25519KeyPair,
    pkcs8: Zeroizing<Vec<u8>>,
}

impl AuthorityKeyPair {
    pub fn generate() -> AuthorityKeyPair {
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("Ed25519 key generation");
        let pkcs8 = Zeroizing::new(doc.as_ref().to_vec());
        AuthorityKeyPair { pair: Ed25519KeyPair::from_pkcs8(&pkcs8).expect("a fresh key parses"), pkcs8 }
    }

    pub fn from_file_text(text: &str) -> Result<AuthorityKeyPair, String> {
        let body = text.trim().strip_prefix(PRIVATE_PREFIX).ok_or("not a Panel license authority private key")?;
        let pkcs8 = Zeroizing::new(STANDARD.decode(body).map_err(|_| "the key is not valid base64")?);
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| "the key is not an Ed25519 PKCS#8 key")?;
        Ok(AuthorityKeyPair { pair, pkcs8 })
    }

    pub fn to_file_text(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("{PRIVATE_PREFIX}{}\n", STANDARD.encode(&*self.pkcs8)))
    }

    pub fn public(&self) -> AuthorityPublicKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        AuthorityPublicKey(key)
    }

    /// Signs a license for `to` with `features`; the id and issue time are chosen here.
    pub fn issue(&self, to: IssuedTo, features: Vec<String>, expires_at: Option<DateTime<Utc>>, trial: bool) -> String {
        let license = License {
            id: format!("lic_{}", hex::encode(crate::random_bytes::<8>())),
            authority: self.public().id(),
            issued_to: to,
            issued_at: Utc::now(),
            expires_at,
            trial,
            features,
        };
        self.sign(&license)
    }

    pub fn sign(&self, license: &License) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(license).expect("license serializes"));
        let signed = format!("{LICENSE_PREFIX}.{payload}");
        let signature = self.pair.sign(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct IssuedTo {
    pub organization: String,
    /// When set, the license grants its features only to a Panel whose From address is in this domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// The signed document. Unknown fields are ignored so that later formats stay readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct License {
    pub id: String,
    /// The signing authority's id (`AuthorityPublicKey::id`).
    pub authority: String,
    pub issued_to: IssuedTo,
    pub issued_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub trial: bool,
    pub features: Vec<String>,
}

impl License {
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// Whether this license grants `feature` now, to a Panel sending from `from_domain`.
    pub fn grants(&self, feature: &str, now: DateTime<Utc>, from_domain: Option<&str>) -> bool {
        !self.is_expired(now) && self.features.iter().any(|f| f == feature) && self.domain_matches(from_domain)
    }

    /// True when the license is not bound to a domain, or `from_domain` is it or a subdomain of it.
    pub fn domain_matches(&self, from_domain: Option<&str>) -> bool {
        let Some(bound) = self.issued_to.domain.as_deref() else { return true };
        let Some(d) = from_domain.map(str::to_ascii_lowercase) else { return false };
        let bound = bound.to_ascii_lowercase();
        d == bound || d.ends_with(&format!(".{bound}"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LicenseError {
    #[error("malformed license key: {0}")]
    Malformed(String),
    #[error(
        "license key signed by an unknown authority {authority}: add its public key to license.authorities in the config file or PANEL_LICENSE_AUTHORITIES"
    )]
    UnknownAuthority { authority: String },
    #[error(
        "license key signature does not verify against authority {authority}: the key was altered after it was issued"
    )]
    Tampered { authority: String },
    #[error("license key {id} expired at {at}")]
    Expired { id: String, at: DateTime<Utc> },
}

/// Parses and verifies a license key's signature; does not look at its expiry.
pub fn verify(text: &str, trusted: &[AuthorityPublicKey]) -> Result<License, LicenseError> {
    let malformed = |why: &str| LicenseError::Malformed(why.to_string());
    let text = text.trim();
    let (signed, signature) =
        text.rsplit_once('.').ok_or_else(|| malformed("expected panel-license-v1.<payload>.<signature>"))?;
    let (prefix, payload) =
        signed.split_once('.').ok_or_else(|| malformed("expected panel-license-v1.<payload>.<signature>"))?;
    if prefix != LICENSE_PREFIX {
        return Err(malformed(&format!(
            "unknown format '{}' (this Panel reads {LICENSE_PREFIX})",
            prefix.chars().take(40).collect::<String>()
        )));
    }
    let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| malformed("the payload is not base64url"))?;
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| malformed("the signature is not base64url"))?;
    let license: License = serde_json::from_slice(&json)
        .map_err(|e| LicenseError::Malformed(format!("the payload is not a license: {e}")))?;
    let authority = trusted
        .iter()
        .find(|a| a.id() == license.authority)
        .ok_or_else(|| LicenseError::UnknownAuthority { authority: license.authority.clone() })?;
    if !authority.verify(signed.as_bytes(), &signature) {
        return Err(LicenseError::Tampered { authority: license.authority.clone() });
    }
    Ok(license)
}

/// Verifies the signature and that the license has not expired at `now`.
pub fn check(text: &str, trusted: &[AuthorityPublicKey], now: DateTime<Utc>) -> Result<License, LicenseError> {
    let license = verify(text, trusted)?;
    if let Some(at) = license.expires_at.filter(|_| license.is_expired(now)) {
        return Err(LicenseError::Expired { id: license.id, at });
    }
    Ok(license)
}

/// `YYYY-MM-DD` (valid through that day, UTC) or an RFC 3339 timestamp.
pub fn parse_expiry(value: &str) -> Result<DateTime<Utc>, String> {
    let v = value.trim();
    if let Ok(day) = NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        let next = day.succ_opt().ok_or_else(|| format!("'{v}' is out of range"))?;
        return Ok(next.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("'{v}' is not a date; use YYYY-MM-DD (valid through that day, UTC) or RFC 3339"))
}

/// Feature names: lowercase letters, digits and `-`.
pub fn validate_feature(name: &str) -> Result<(), String> {
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok { Ok(()) } else { Err(format!("'{name}' is not a feature name (lowercase letters, digits, '-')")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org() -> IssuedTo {
        IssuedTo { organization: "Contoso".into(), domain: None }
    }

    #[test]
    fn issued_keys_verify_and_grant_their_features() {
        let authority = AuthorityKeyPair::generate();
        let key = authority.issue(org(), vec!["credential-storage".into()], None, false);
        let license = check(&key, &[authority.public()], Utc::now()).unwrap();
        assert_eq!(license.issued_to.organization, "Contoso");
        assert_eq!(license.authority, authority.public().id());
        assert!(license.grants("credential-storage", Utc::now(), None));
        assert!(!license.grants("something-else", Utc::now(), None));
    }

    #[test]
    fn a_changed_payload_is_tampered() {
        let authority = AuthorityKeyPair::generate();
        let key = authority.issue(org(), vec!["credential-storage".into()], None, true);
        let parts: Vec<&str> = key.split('.').collect();
        let mut json: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        json["trial"] = false.into();
        let forged = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(json.to_string()), parts[2]);
        let err = verify(&forged, &[authority.public()]).unwrap_err();
        assert!(matches!(err, LicenseError::Tampered { .. }), "{err}");
        assert!(err.to_string().contains("altered"));
    }

    #[test]
    fn unknown_authorities_and_garbage_are_named() {
        let ours = AuthorityKeyPair::generate();
        let theirs = AuthorityKeyPair::generate();
        let key = theirs.issue(org(), vec!["credential-storage".into()], None, false);
        let err = verify(&key, &[ours.public()]).unwrap_err();
        assert_eq!(err, LicenseError::UnknownAuthority { authority: theirs.public().id() });
        // Several trusted authorities: any of them may sign.
        assert!(verify(&key, &[ours.public(), theirs.public()]).is_ok());
        for garbage in ["", "hello", "panel-license-v2.abc.def", "panel-license-v1.!!!.abc", "panel-license-v1.e30.AA"]
        {
            assert!(matches!(verify(garbage, &[ours.public()]), Err(LicenseError::Malformed(_))), "{garbage}");
        }
    }

    #[test]
    fn expiry_is_checked_at_the_time_given() {
        let authority = AuthorityKeyPair::generate();
        let at = parse_expiry("2026-12-31").unwrap();
        assert_eq!(at.to_rfc3339(), "2027-01-01T00:00:00+00:00");
        let key = authority.issue(org(), vec!["credential-storage".into()], Some(at), false);
        let before = parse_expiry("2026-12-31T23:59:59Z").unwrap();
        let license = check(&key, &[authority.public()], before).unwrap();
        assert!(license.grants("credential-storage", before, None));
        assert!(!license.grants("credential-storage", at, None));
        assert!(matches!(check(&key, &[authority.public()], at), Err(LicenseError::Expired { .. })));
        assert!(parse_expiry("31/12/2026").is_err());
    }

    #[test]
    fn domain_bound_licenses_match_the_from_domain_and_its_subdomains() {
        let authority = AuthorityKeyPair::generate();
        let to = IssuedTo { organization: "Contoso".into(), domain: Some("contoso.com".into()) };
        let key = authority.issue(to, vec!["credential-storage".into()], None, false);
        let license = verify(&key, &[authority.public()]).unwrap();
        let now = Utc::now();
        assert!(license.grants("credential-storage", now, Some("contoso.com")));
        assert!(license.grants("credential-storage", now, Some("mail.Contoso.com")));
        assert!(!license.grants("credential-storage", now, Some("notcontoso.com")));
        assert!(!license.grants("credential-storage", now, None));
    }

    #[test]
    fn key_files_and_public_keys_round_trip() {
        let authority = AuthorityKeyPair::generate();
        let again = AuthorityKeyPair::from_file_text(&authority.to_file_text()).unwrap();
        assert_eq!(again.public(), authority.public());
        let public = AuthorityPublicKey::parse(&authority.public().to_string()).unwrap();
        assert_eq!(public.id(), authority.public().id());
        assert!(AuthorityPublicKey::parse("ed25519:abc").is_err());
        assert!(AuthorityKeyPair::from_file_text("panel-authority-key-v1:AAAA").is_err());
    }
}
