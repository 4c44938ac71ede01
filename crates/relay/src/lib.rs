//! Panel's SMTP relay client. Written on tokio + rustls rather than on lettre's transport because
//! Panel needs what that transport hides: the stage of every failure, per-recipient RCPT replies,
//! per-command timeouts, the certificate details, and room for more AUTH mechanisms.

pub mod auth;
pub mod check;
pub mod connection;
pub mod graph;
pub mod gssapi;
pub mod http;
pub mod imap;
pub mod inbound;
pub mod ntlm;
pub mod oauth;
pub mod relay;
pub mod tls;
pub mod wire;

pub use auth::{AuthSecret, BoxFuture, CredentialSource, Resolved};
pub use check::{CheckFailure, CheckReport, check};
pub use connection::{Connection, StageEvent, Transcript, local_hostname};
pub use graph::Graph;
pub use relay::Relay;
pub use tls::TlsInfo;

/// `N` random bytes from the system's generator.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("the system's random generator");
    b
}
