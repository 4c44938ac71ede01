//! Envelope encryption: each secret is sealed with its own random data key (AES-256-GCM), and
//! the data key is wrapped by the master key. Both are bound to the credential id as associated
//! data, so a ciphertext copied onto another credential's row does not decrypt. Rotating the
//! master key re-wraps data keys without touching the secrets.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VaultError {
    #[error(
        "credential {credential} was encrypted with master key {expected}, which is not in the master key file (it holds {available}); restore the key file that belongs to this database or point PANEL_MASTER_KEY_FILE at it"
    )]
    UnknownMasterKey { credential: String, expected: String, available: String },
    #[error(
        "credential {credential} does not decrypt with master key {key}: the key file or the stored credential is damaged; restore the key file from backup or store the credential again"
    )]
    Decrypt { credential: String, key: String },
}

/// A 256-bit master key and its id (a hash of the key, safe to show and store).
pub struct MasterKey {
    id: String,
    key: Zeroizing<[u8; 32]>,
}

impl MasterKey {
    pub fn generate() -> MasterKey {
        MasterKey::from_bytes(crate::random_bytes::<32>())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> MasterKey {
        let key = Zeroizing::new(bytes);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"panel-master-key-id-v1\0");
        ctx.update(&*key);
        let id = format!("mk_{}", hex::encode(&ctx.finish().as_ref()[..8]));
        MasterKey { id, key }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.key
    }
}

/// A secret as stored: which master key wrapped its data key, the wrapped data key, and the
/// sealed secret. Each blob is `nonce || ciphertext || tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub master_key_id: String,
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

fn secret_aad(credential_id: &str) -> Vec<u8> {
    [b"panel-credential-secret-v1\0".as_slice(), credential_id.as_bytes()].concat()
}

fn wrap_aad(credential_id: &str) -> Vec<u8> {
    [b"panel-credential-data-key-v1\0".as_slice(), credential_id.as_bytes()].concat()
}

fn seal_with(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte key"));
    let nonce = crate::random_bytes::<NONCE_LEN>();
    let mut buf = plaintext.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
        .expect("sealing cannot fail for in-memory data");
    [nonce.as_slice(), &buf].concat()
}

fn open_with(key: &[u8; 32], aad: &[u8], blob: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if blob.len() < NONCE_LEN {
        return None;
    }
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte key"));
    let (nonce, sealed) = blob.split_at(NONCE_LEN);
    let mut buf = Zeroizing::new(sealed.to_vec());
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let len = key.open_in_place(nonce, Aad::from(aad), &mut buf).ok()?.len();
    buf.truncate(len);
    Some(buf)
}

/// Seals `secret` for credential `credential_id` under a fresh data key.
pub fn seal(master: &MasterKey, credential_id: &str, secret: &[u8]) -> Sealed {
    let data_key = Zeroizing::new(crate::random_bytes::<32>());
    Sealed {
        master_key_id: master.id.clone(),
        wrapped_key: seal_with(master.bytes(), &wrap_aad(credential_id), &*data_key),
        ciphertext: seal_with(&data_key, &secret_aad(credential_id), secret),
    }
}

fn unwrap_key(master: &MasterKey, credential_id: &str, sealed: &Sealed) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let fail = || VaultError::Decrypt { credential: credential_id.into(), key: master.id.clone() };
    let bytes = open_with(master.bytes(), &wrap_aad(credential_id), &sealed.wrapped_key).ok_or_else(fail)?;
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        return Err(fail());
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// Opens a sealed secret. `master` must be the key named by `sealed.master_key_id`.
pub fn open(master: &MasterKey, credential_id: &str, sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let data_key = unwrap_key(master, credential_id, sealed)?;
    open_with(&data_key, &secret_aad(credential_id), &sealed.ciphertext)
        .ok_or_else(|| VaultError::Decrypt { credential: credential_id.into(), key: master.id.clone() })
}

/// Re-wraps the data key under `new`; the sealed secret itself is unchanged.
pub fn rewrap(old: &MasterKey, new: &MasterKey, credential_id: &str, sealed: &Sealed) -> Result<Sealed, VaultError> {
    let data_key = unwrap_key(old, credential_id, sealed)?;
    Ok(Sealed {
        master_key_id: new.id.clone(),
        wrapped_key: seal_with(new.bytes(), &wrap_aad(credential_id), &*data_key),
        ciphertext: sealed.ciphertext.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_without_keeping_the_plaintext() {
        let master = MasterKey::generate();
        let sealed = seal(&master, "cred_1", b"correct horse");
        assert_eq!(sealed.master_key_id, master.id());
        assert!(!sealed.ciphertext.windows(7).any(|w| w == b"correct"));
        assert_eq!(&*open(&master, "cred_1", &sealed).unwrap(), b"correct horse");
    }

    #[test]
    fn ciphertext_is_bound_to_its_credential_id() {
        let master = MasterKey::generate();
        let sealed = seal(&master, "cred_1", b"secret");
        assert!(matches!(open(&master, "cred_2", &sealed), Err(VaultError::Decrypt { .. })));
    }

    #[test]
    fn a_wrong_master_key_or_a_flipped_bit_is_an_error_not_garbage() {
        let master = MasterKey::generate();
        let sealed = seal(&master, "cred_1", b"secret");
        assert!(open(&MasterKey::generate(), "cred_1", &sealed).is_err());
        let mut damaged = sealed.clone();
        let last = damaged.ciphertext.len() - 1;
        damaged.ciphertext[last] ^= 1;
        assert!(open(&master, "cred_1", &damaged).is_err());
        damaged = sealed.clone();
        damaged.wrapped_key.truncate(5);
        assert!(open(&master, "cred_1", &damaged).is_err());
    }

    #[test]
    fn rewrap_moves_the_data_key_to_the_new_master_key() {
        let (old, new) = (MasterKey::generate(), MasterKey::generate());
        let sealed = seal(&old, "cred_1", b"secret");
        let moved = rewrap(&old, &new, "cred_1", &sealed).unwrap();
        assert_eq!(moved.master_key_id, new.id());
        assert_eq!(moved.ciphertext, sealed.ciphertext);
        assert_eq!(&*open(&new, "cred_1", &moved).unwrap(), b"secret");
        assert!(open(&old, "cred_1", &moved).is_err());
    }

    #[test]
    fn key_ids_are_stable_and_distinct() {
        let a = MasterKey::from_bytes([7; 32]);
        assert_eq!(a.id(), MasterKey::from_bytes([7; 32]).id());
        assert_ne!(a.id(), MasterKey::from_bytes([8; 32]).id());
        assert!(a.id().starts_with("mk_"));
    }
}
