//! TLS for relay connections: system roots plus an optional CA file, an optional SHA-256 pin,
//! TLS 1.2 minimum, and the certificate details `panel smtp check` shows.

use std::path::Path;
use std::sync::{Arc, Mutex};

use panel_domain::{Failure, FailureKind, Stage};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;

/// What we learned about the relay's certificate and session.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct TlsInfo {
    pub protocol: String,
    pub cipher_suite: String,
    pub subject: String,
    pub issuer: String,
    pub not_after: String,
    pub sha256: String,
    /// `trusted (system roots or CA file)`, `pinned`, or why it was refused.
    pub verification: String,
}

/// The trust anchors for one settings version; building it reads the system store, so it is cached.
#[derive(Clone)]
pub struct TlsTrust {
    roots: Arc<RootCertStore>,
    pin: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl TlsTrust {
    pub fn load(ca_file: Option<&Path>, pin: Option<[u8; 32]>) -> Result<TlsTrust, Failure> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = ca_file {
            let local = |e: String| Failure::new(Stage::Config, FailureKind::LocalConfig, e);
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| local(format!("CA file {} cannot be read: {e}", path.display())))?
                .collect::<Result<_, _>>()
                .map_err(|e| local(format!("CA file {} is not valid PEM: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(local(format!("CA file {} holds no certificate", path.display())));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| local(format!("CA file {} has an unusable certificate: {e}", path.display())))?;
            }
        }
        Ok(TlsTrust { roots: Arc::new(roots), pin, provider: Arc::new(ring::default_provider()) })
    }

    /// The system's trust anchors alone (token endpoints), read once per process: reading the
    /// system store on every token request costs a file scan each time.
    pub fn system() -> &'static TlsTrust {
        static SYSTEM: std::sync::OnceLock<TlsTrust> = std::sync::OnceLock::new();
        SYSTEM.get_or_init(|| TlsTrust::load(None, None).expect("without a CA file, loading cannot fail"))
    }

    /// A client configuration for one connection, with a verifier that remembers the relay's
    /// certificate even when it refuses it (so the admin can see and pin it).
    pub fn client_config(&self) -> Result<(Arc<ClientConfig>, Arc<CapturingVerifier>), Failure> {
        let inner = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone()).build();
        let inner = match inner {
            Ok(v) => Some(v),
            // No roots at all (minimal container) is fine when the certificate is pinned.
            Err(_) if self.pin.is_some() => None,
            Err(e) => {
                return Err(Failure::new(
                    Stage::Config,
                    FailureKind::LocalConfig,
                    format!("no usable CA certificates: {e}"),
                ));
            }
        };
        let verifier = Arc::new(CapturingVerifier {
            inner,
            pin: self.pin,
            provider: self.provider.clone(),
            seen: Mutex::new(None),
        });
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        Ok((Arc::new(config), verifier))
    }
}

pub fn server_name(name: &str) -> Result<ServerName<'static>, Failure> {
    ServerName::try_from(name.to_string()).map_err(|_| {
        Failure::new(Stage::Config, FailureKind::LocalConfig, format!("'{name}' is not a valid TLS server name"))
    })
}

#[derive(Debug)]
pub struct CapturingVerifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    pin: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
    seen: Mutex<Option<CertificateDer<'static>>>,
}

impl CapturingVerifier {
    pub fn seen_certificate(&self) -> Option<CertificateDer<'static>> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(::ring::digest::digest(&::ring::digest::SHA256, der))
}

impl ServerCertVerifier for CapturingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().expect("not poisoned") = Some(end_entity.clone().into_owned());
        if let Some(pin) = self.pin {
            let actual = ::ring::digest::digest(&::ring::digest::SHA256, end_entity.as_ref());
            return if actual.as_ref() == pin {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(rustls::Error::General(format!(
                    "certificate fingerprint {} does not match the pinned {}",
                    hex::encode(actual.as_ref()),
                    hex::encode(pin)
                )))
            };
        }
        match &self.inner {
            Some(v) => v.verify_server_cert(end_entity, intermediates, server_name, ocsp, now),
            None => Err(rustls::Error::General("no trusted CA certificates".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Subject, issuer, expiry and fingerprint of a DER certificate.
pub fn describe_certificate(der: &[u8], info: &mut TlsInfo) {
    info.sha256 = sha256_hex(der);
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
        info.subject = cert.subject().to_string();
        info.issuer = cert.issuer().to_string();
        info.not_after =
            cert.validity().not_after.to_rfc2822().unwrap_or_else(|_| cert.validity().not_after.to_string());
    }
}

/// Turns a handshake error into a classified failure.
pub fn handshake_failure(error: &std::io::Error, verifier: &CapturingVerifier, implicit: bool) -> Failure {
    let tls_error = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    let seen = verifier.seen_certificate();
    let fingerprint = seen.as_ref().map(|c| format!(" (certificate SHA-256 {})", sha256_hex(c))).unwrap_or_default();
    match tls_error {
        Some(rustls::Error::InvalidCertificate(reason)) => Failure::new(
            Stage::Tls,
            FailureKind::CertificateUntrusted,
            format!("the relay's certificate was refused: {}{fingerprint}", describe_cert_error(reason)),
        ),
        Some(rustls::Error::General(text)) if seen.is_some() => Failure::new(
            Stage::Tls,
            FailureKind::CertificateUntrusted,
            format!("the relay's certificate was refused: {text}"),
        ),
        Some(rustls::Error::InvalidMessage(_)) if implicit => Failure::new(
            Stage::Tls,
            FailureKind::TlsModeMismatch,
            "the relay answered in plain text instead of a TLS handshake".to_string(),
        ),
        // The relay's own alert: a version or cipher refusal may mean an older TLS; anything
        // else (an internal error, a bad certificate of its own) is the relay's TLS setup failing.
        Some(rustls::Error::AlertReceived(alert)) => {
            use rustls::AlertDescription as A;
            match alert {
                A::ProtocolVersion | A::InsufficientSecurity | A::HandshakeFailure => Failure::new(
                    Stage::Tls,
                    FailureKind::TlsHandshake,
                    format!("TLS handshake failed: the relay sent the alert {alert:?}"),
                ),
                other => Failure::new(
                    Stage::Tls,
                    FailureKind::TlsAlert,
                    format!("the relay ended the TLS handshake with the alert {other:?}: its TLS setup failed"),
                ),
            }
        }
        Some(e) => Failure::new(Stage::Tls, FailureKind::TlsHandshake, format!("TLS handshake failed: {e}")),
        None if error.kind() == std::io::ErrorKind::UnexpectedEof => Failure::new(
            Stage::Tls,
            FailureKind::TlsHandshake,
            "the relay closed the connection during the TLS handshake".to_string(),
        ),
        None => Failure::new(Stage::Tls, FailureKind::TlsHandshake, format!("TLS handshake failed: {error}")),
    }
}

fn describe_cert_error(e: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match e {
        C::UnknownIssuer => "it is signed by an unknown CA (self-signed or private CA)".into(),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "it is not valid for the relay's name (set --tls-server-name to the name in the certificate)".into()
        }
        C::Expired | C::ExpiredContext { .. } => "it has expired".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet (check this host's clock)".into(),
        C::Revoked => "it has been revoked".into(),
        // webpki's words for a CA certificate presented as the server's own: self-signed.
        other if format!("{other:?}").contains("CaUsedAsEndEntity") => {
            "the relay's certificate is self-signed; set --pin-sha256 to its fingerprint, or --ca-file".into()
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(e: rustls::Error) -> Failure {
        let (_, verifier) = TlsTrust::system().client_config().expect("the system roots load");
        handshake_failure(&std::io::Error::new(std::io::ErrorKind::InvalidData, e), &verifier, false)
    }

    #[test]
    fn the_relays_own_alert_is_named_and_only_version_alerts_suggest_an_older_tls() {
        let internal = failure(rustls::Error::AlertReceived(rustls::AlertDescription::InternalError));
        assert_eq!(internal.kind, FailureKind::TlsAlert);
        assert!(internal.detail.contains("InternalError") && internal.detail.contains("TLS setup failed"));
        let version = failure(rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion));
        assert_eq!(version.kind, FailureKind::TlsHandshake);
        assert!(version.detail.contains("ProtocolVersion"), "{}", version.detail);
    }

    #[test]
    fn a_self_signed_certificate_is_called_so_with_the_fix() {
        #[derive(Debug)]
        struct CaUsedAsEndEntity;
        impl std::fmt::Display for CaUsedAsEndEntity {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("CaUsedAsEndEntity")
            }
        }
        impl std::error::Error for CaUsedAsEndEntity {}
        let other = rustls::CertificateError::Other(rustls::OtherError(Arc::new(CaUsedAsEndEntity)));
        let text = describe_cert_error(&other);
        assert!(text.contains("self-signed") && text.contains("--pin-sha256"), "{text}");
        let f = failure(rustls::Error::InvalidCertificate(other));
        assert_eq!(f.kind, FailureKind::CertificateUntrusted);
        assert!(!f.detail.contains("Other(") && f.detail.contains("self-signed"), "{}", f.detail);
    }
}
