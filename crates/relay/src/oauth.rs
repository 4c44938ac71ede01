//! OAuth2 access tokens for SMTP (XOAUTH2): Microsoft's client-credentials grant and Google's
//! service-account JWT bearer grant. The provider's own error text is kept for the admin.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use panel_domain::{EndpointUrl, Failure, FailureKind, OAuthProvider, Secret, Stage};
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;
use zeroize::Zeroizing;

/// A token and when it stops working.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub access_token: Secret,
    pub expires_at: DateTime<Utc>,
    /// The endpoint that issued it.
    pub endpoint: String,
    /// The token stage as it happened: endpoint, HTTP status, expiry.
    pub note: String,
}

/// Who asks for a token, and how.
pub enum TokenClient {
    /// `scope`: SMTP's (`OAuthProvider::scope`) or Graph's (`OAuthProvider::GRAPH_SCOPE`).
    Microsoft {
        endpoint: EndpointUrl,
        client_id: String,
        client_secret: Secret,
        scope: &'static str,
    },
    /// The same app proving itself with a client assertion signed by its certificate's key.
    MicrosoftCertificate {
        endpoint: EndpointUrl,
        client_id: String,
        certificate: Box<AppCertificate>,
        scope: &'static str,
    },
    Google {
        endpoint: EndpointUrl,
        key: Box<ServiceAccountKey>,
        subject: String,
    },
}

impl TokenClient {
    pub fn endpoint(&self) -> &EndpointUrl {
        match self {
            TokenClient::Microsoft { endpoint, .. }
            | TokenClient::MicrosoftCertificate { endpoint, .. }
            | TokenClient::Google { endpoint, .. } => endpoint,
        }
    }
}

/// An Entra app's certificate credential: the private key (PKCS#8, RSA) and its certificate, as
/// one PEM text. Entra knows the certificate by its SHA-256 thumbprint (`x5t#S256`).
pub struct AppCertificate {
    key: RsaKeyPair,
    thumbprint: [u8; 32],
}

impl AppCertificate {
    /// Parses the PEM; errors never quote the key.
    pub fn parse(pem: &[u8]) -> Result<AppCertificate, String> {
        use rustls_pki_types::CertificateDer;
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|_| {
            "no PEM PKCS#8 private key (-----BEGIN PRIVATE KEY-----) in it; give the key and its certificate in one file"
                .to_string()
        })?;
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| format!("the private key is not a usable RSA key (Entra takes RSA): {e}"))?;
        let certificate = CertificateDer::from_pem_slice(pem).map_err(|_| {
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it: add the app's certificate".to_string()
        })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&certificate)
            .map_err(|_| "the certificate is not a valid X.509 certificate".to_string())?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public().as_ref() {
            return Err("the certificate does not belong to the private key (their public keys differ)".into());
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &certificate);
        let thumbprint = digest.as_ref().try_into().expect("SHA-256 is 32 bytes");
        Ok(AppCertificate { key, thumbprint })
    }

    /// The thumbprint as the app registration's Certificates list shows it (hex).
    pub fn thumbprint_hex(&self) -> String {
        hex::encode_upper(self.thumbprint)
    }

    /// The client assertion (RFC 7523; Entra's "certificate credentials"): PS256, `x5t#S256`,
    /// for `audience` (the token endpoint), valid ten minutes.
    fn assertion(&self, client_id: &str, audience: &str, now: DateTime<Utc>) -> Zeroizing<String> {
        let header =
            serde_json::json!({"alg": "PS256", "typ": "JWT", "x5t#S256": URL_SAFE_NO_PAD.encode(self.thumbprint)});
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": hex::encode(crate::random_bytes::<16>()),
            "nbf": now.timestamp(),
            "iat": now.timestamp(),
            "exp": now.timestamp() + 600,
        });
        let signed =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&ring::signature::RSA_PSS_SHA256, &ring::rand::SystemRandom::new(), signed.as_bytes(), &mut signature)
            .expect("RSA signing of a small message");
        Zeroizing::new(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// A Google service account key file (the JSON the console downloads).
pub struct ServiceAccountKey {
    pub client_email: String,
    pub token_uri: Option<String>,
    key: RsaKeyPair,
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: String,
    private_key: Zeroizing<String>,
    token_uri: Option<String>,
}

impl ServiceAccountKey {
    /// Parses the key file; errors never quote the key.
    pub fn parse(json: &[u8]) -> Result<ServiceAccountKey, String> {
        let file: KeyFile = serde_json::from_slice(json).map_err(|e| {
            format!("not a Google service account key file (line {}, column {}): expected JSON with client_email and private_key", e.line(), e.column())
        })?;
        if file.kind.as_deref().is_some_and(|k| k != "service_account") {
            return Err(format!("the key file is of type '{}', not service_account", file.kind.unwrap_or_default()));
        }
        let der = PrivatePkcs8KeyDer::from_pem_slice(file.private_key.as_bytes())
            .map_err(|_| "the key file's private_key is not a PEM PKCS#8 private key".to_string())?;
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| format!("the key file's private_key is not a usable RSA key: {e}"))?;
        Ok(ServiceAccountKey { client_email: file.client_email, token_uri: file.token_uri, key })
    }

    /// A signed JWT assertion asking for `scope` on behalf of `subject` (domain-wide delegation).
    fn assertion(&self, audience: &str, scope: &str, subject: &str, now: DateTime<Utc>) -> Zeroizing<String> {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": scope,
            "aud": audience,
            "sub": subject,
            "iat": now.timestamp(),
            "exp": now.timestamp() + 3600,
        });
        let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), signed.as_bytes(), &mut signature)
            .expect("RSA signing of a small message");
        Zeroizing::new(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<Zeroizing<String>>,
    expires_in: Option<serde_json::Value>,
    error: Option<String>,
    error_description: Option<String>,
}

/// The encoded form, in a buffer that is wiped when dropped. It is allocated once at its largest
/// possible size (every byte percent-encoded, plus the separators), so the serializer never
/// grows it and leaves no copy of the secret behind in freed memory.
fn form(pairs: &[(&str, &str)]) -> Zeroizing<String> {
    let bound: usize = pairs.iter().map(|(k, v)| 3 * (k.len() + v.len()) + 2).sum();
    let mut s = form_urlencoded::Serializer::new(String::with_capacity(bound));
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    Zeroizing::new(s.finish())
}

/// Asks the provider for a token.
pub async fn fetch_token(client: &TokenClient, limit: Duration) -> Result<TokenGrant, Failure> {
    let endpoint = client.endpoint();
    let body = match client {
        TokenClient::Microsoft { client_id, client_secret, scope, .. } => form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", client_secret.expose()),
            ("scope", scope),
        ]),
        TokenClient::MicrosoftCertificate { client_id, certificate, scope, .. } => {
            let assertion = certificate.assertion(client_id, &endpoint.to_string(), Utc::now());
            form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                ("client_assertion", &assertion),
                ("scope", scope),
            ])
        }
        TokenClient::Google { key, subject, .. } => {
            let assertion = key.assertion(&endpoint.to_string(), OAuthProvider::Google.scope(), subject, Utc::now());
            form(&[("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", &assertion)])
        }
    };
    let unavailable = |detail: String| Failure::new(Stage::Token, FailureKind::TokenUnavailable, detail);
    let response = crate::http::post_form(endpoint, body, limit).await.map_err(unavailable)?;
    let answer: Option<TokenAnswer> = serde_json::from_slice(&response.body).ok();
    let status = response.status;
    let provider_error = answer.as_ref().and_then(|a| {
        let text =
            [a.error.as_deref(), a.error_description.as_deref()].into_iter().flatten().collect::<Vec<_>>().join(": ");
        (!text.is_empty()).then(|| text.replace(['\r', '\n'], " "))
    });
    if status != 200 {
        let detail = format!(
            "the token endpoint {endpoint} answered HTTP {status}: {}",
            provider_error.unwrap_or_else(|| "no error description".into())
        );
        let retryable = status >= 500 || status == 429 || status == 408;
        let kind = if retryable { FailureKind::TokenUnavailable } else { FailureKind::TokenRejected };
        return Err(Failure::new(Stage::Token, kind, detail));
    }
    let Some(TokenAnswer { access_token: Some(token), expires_in, .. }) = answer else {
        return Err(unavailable(format!("the token endpoint {endpoint} answered HTTP 200 without an access_token")));
    };
    // expires_in is a number, but some providers send it as a string.
    let seconds = match expires_in {
        Some(serde_json::Value::Number(n)) => n.as_i64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .unwrap_or(3600)
    .clamp(0, 86_400 * 7);
    let expires_at = Utc::now() + chrono::Duration::seconds(seconds);
    let note = format!(
        "token from {endpoint}: HTTP 200, expires at {} (in {seconds}s)",
        expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    Ok(TokenGrant { access_token: Secret::new(token.to_string()), expires_at, endpoint: endpoint.to_string(), note })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_with_the_secret_is_built_in_one_allocation() {
        // A grown String leaves its old buffer (holding the secret) in freed memory unwiped.
        let secret = "s3cr3t&=/+ with spaces and ü".repeat(20);
        let pairs = [("grant_type", "client_credentials"), ("client_secret", secret.as_str())];
        let bound: usize = pairs.iter().map(|(k, v)| 3 * (k.len() + v.len()) + 2).sum();
        let encoded = form(&pairs);
        assert_eq!(encoded.capacity(), bound, "never reallocated");
        assert!(encoded.contains("client_secret=s3cr3t%26%3D%2F%2B+with"), "{}", &encoded[..60]);
    }
}
