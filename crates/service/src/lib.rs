//! The running parts of Panel (worker, heartbeat, wake-ups) and the operations that the CLI and
//! the REST API share, so both behave the same.

pub mod accounts;
pub mod automation;
mod bounces;
pub mod clock;
mod credential_source;
mod error;
pub mod licensing;
pub mod metrics;
pub mod ops;
mod queue;
pub mod registry;
pub mod retention;
pub mod scheduler;
mod settings;
pub mod supervisor;
pub mod vault;
pub mod views;
pub mod wake;
pub mod worker;

pub use bounces::{BounceHandler, BounceMailbox, MailboxAuth, MailboxPass, Receipt};
pub use error::{ErrorKind, OpsError};
pub use ops::{Panel, Seen, SettingsUpdate};
pub use panel_store::redact_url;
pub use registry::{ConfigReport, ConfigReporter, ServiceHandle, liveness_window};
pub use scheduler::run_scheduler;
pub use vault::{CredentialInfo, CredentialInput, SecretsConfig};
pub use worker::{WorkerConfig, run_worker};

/// A random number from the system's CSPRNG (Message-ID uniqueness, retry jitter).
pub fn random_u128() -> u128 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).expect("the system RNG works");
    u128::from_le_bytes(bytes)
}
