//! Trust and secrets, with no database and no network: license keys signed by a license
//! authority (Ed25519), and envelope encryption of stored credentials (AES-256-GCM data keys
//! wrapped by a master key kept in a file outside the database).

pub mod envelope;
pub mod keyfile;
pub mod license;

pub use envelope::{MasterKey, Sealed, VaultError};
pub use keyfile::{KeyFileError, Keyring};
pub use license::{AuthorityKeyPair, AuthorityPublicKey, License, LicenseError};

/// `n` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new().fill(&mut out).expect("the OS random generator works");
    out
}
