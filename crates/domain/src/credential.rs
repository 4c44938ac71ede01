//! Stored credentials: their names and kinds. The secret itself never enters the domain.

use crate::errors::FieldError;
use crate::oauth::OAuthProvider;

/// The license feature that allows storing and using secrets.
pub const CREDENTIAL_STORAGE: &str = "credential-storage";

crate::string_enum!(
    /// What a stored credential holds.
    CredentialKind {
        /// A relay username and password (AUTH PLAIN / LOGIN).
        Password = "password",
        /// A Microsoft Entra app registration: client id (the username), tenant, client secret.
        MicrosoftClientSecret = "microsoft-client-secret",
        /// A Microsoft Entra app registration that proves itself with a certificate (many tenants
        /// forbid client secrets): client id, tenant, and the private key with its certificate
        /// (PEM); Panel signs a client assertion with the key.
        MicrosoftCertificate = "microsoft-certificate",
        /// A Google service account key (JSON) with domain-wide delegation.
        GoogleServiceAccount = "google-service-account",
    }
);

impl CredentialKind {
    /// The kinds an OAuth2 provider takes.
    pub fn for_provider(provider: OAuthProvider) -> &'static [Self] {
        match provider {
            OAuthProvider::Microsoft => &[Self::MicrosoftClientSecret, Self::MicrosoftCertificate],
            OAuthProvider::Google => &[Self::GoogleServiceAccount],
        }
    }

    /// `kinds` in words: "microsoft-client-secret or microsoft-certificate".
    pub fn either(kinds: &[Self]) -> String {
        kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(" or ")
    }
}

/// Names are identifiers that appear in settings and commands: 1-64 of letters, digits, `.`, `_`, `-`.
pub fn validate_name(field: &str, value: &str) -> Result<String, FieldError> {
    let v = value.trim();
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(v.to_string())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "'{v}' is not a credential name; use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_identifiers() {
        assert_eq!(validate_name("credential", " relay-pw ").unwrap(), "relay-pw");
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(65)] {
            assert!(validate_name("credential", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kinds_round_trip_and_match_providers() {
        for k in CredentialKind::ALL {
            assert_eq!(CredentialKind::parse(k).unwrap().as_str(), *k);
        }
        assert_eq!(CredentialKind::for_provider(OAuthProvider::Google), [CredentialKind::GoogleServiceAccount]);
        assert!(CredentialKind::for_provider(OAuthProvider::Microsoft).contains(&CredentialKind::MicrosoftCertificate));
    }
}
