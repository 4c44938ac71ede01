//! The master key file: kept outside the database, readable by the service account only.
//! One key per line, the current one first; during a rotation the previous key stays on the
//! following line until every data key is re-wrapped, so a crash at any point leaves a file
//! that opens every stored credential.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

use crate::envelope::MasterKey;

const LINE_PREFIX: &str = "panel-master-key-v1";

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("master key file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("master key file {path} cannot be written: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// Another process created the file first (concurrent first starts): load it instead.
    #[error("master key file {path} already exists")]
    Exists { path: PathBuf },
}

pub struct Keyring {
    path: PathBuf,
    /// The current key first.
    keys: Vec<MasterKey>,
}

impl Keyring {
    /// Reads the key file; `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<Keyring>, KeyFileError> {
        let invalid = |reason: String| KeyFileError::Invalid { path: path.to_path_buf(), reason };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => Zeroizing::new(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(invalid(format!("cannot be read: {e}"))),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map_err(|e| invalid(e.to_string()))?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(invalid(format!(
                    "is readable by other users (mode {:o}); run: chmod 600 {}",
                    mode & 0o777,
                    path.display()
                )));
            }
        }
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate().map(|(n, l)| (n + 1, l.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(LINE_PREFIX), Some(id), Some(b64), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(invalid(format!("line {n} is not '{LINE_PREFIX} <id> <base64 key>'")));
            };
            let bytes =
                Zeroizing::new(STANDARD.decode(b64).map_err(|_| invalid(format!("line {n}: the key is not base64")))?);
            let array: [u8; 32] =
                bytes.as_slice().try_into().map_err(|_| invalid(format!("line {n}: a master key has 32 bytes")))?;
            let key = MasterKey::from_bytes(array);
            if key.id() != id {
                return Err(invalid(format!(
                    "line {n}: the key does not match its id {id} (the file was edited or damaged)"
                )));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(invalid("holds no key".into()));
        }
        Ok(Some(Keyring { path: path.to_path_buf(), keys }))
    }

    /// Creates a new key file with a fresh key; `Exists` if the file exists or another process
    /// created it at the same moment (exactly one creator wins).
    pub fn create(path: &Path) -> Result<Keyring, KeyFileError> {
        let ring = Keyring { path: path.to_path_buf(), keys: vec![MasterKey::generate()] };
        ring.write(false)?;
        Ok(ring)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn current(&self) -> &MasterKey {
        &self.keys[0]
    }

    pub fn find(&self, id: &str) -> Option<&MasterKey> {
        self.keys.iter().find(|k| k.id() == id)
    }

    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(MasterKey::id).collect()
    }

    /// Puts a fresh key in front (the old ones stay for unwrapping) and saves the file.
    pub fn begin_rotation(&mut self) -> Result<&MasterKey, KeyFileError> {
        self.keys.insert(0, MasterKey::generate());
        self.write(true)?;
        Ok(&self.keys[0])
    }

    /// Drops every key but the current one and saves the file.
    pub fn finish_rotation(&mut self) -> Result<(), KeyFileError> {
        self.keys.truncate(1);
        self.write(true)
    }

    /// Writes the file with mode 0600: a temporary file, fsync, rename, fsync of the directory.
    fn write(&self, replace: bool) -> Result<(), KeyFileError> {
        let err = |source| KeyFileError::Write { path: self.path.clone(), source };
        let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut text = Zeroizing::new(String::from(
            "# Panel master key: decrypts the credentials stored in Panel's database.\n\
             # Keep it secret, readable by the service account only, and backed up apart from the database.\n",
        ));
        for k in &self.keys {
            text.push_str(&format!("{LINE_PREFIX} {} {}\n", k.id(), STANDARD.encode(k.bytes())));
        }
        let name = self.path.file_name().and_then(|n| n.to_str()).unwrap_or("master.key");
        let tmp = dir.join(format!(".{name}.{}.tmp", hex::encode(crate::random_bytes::<8>())));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).map_err(err)?;
        file.write_all(text.as_bytes()).and_then(|_| file.sync_all()).map_err(err)?;
        if replace {
            std::fs::rename(&tmp, &self.path).map_err(err)?;
        } else {
            // A hard link fails if the name exists: an atomic create-if-absent.
            let linked = std::fs::hard_link(&tmp, &self.path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(KeyFileError::Exists { path: self.path.clone() });
                }
                other => other.map_err(err)?,
            }
        }
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_files_are_private_and_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let created = Keyring::create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let loaded = Keyring::load(&path).unwrap().unwrap();
        assert_eq!(loaded.current().id(), created.current().id());
        assert!(matches!(Keyring::create(&path), Err(KeyFileError::Exists { .. })), "never overwrites a key");
        assert_eq!(Keyring::load(&path).unwrap().unwrap().current().id(), created.current().id());
        assert!(Keyring::load(&dir.path().join("missing")).unwrap().is_none());
    }

    #[test]
    fn concurrent_first_creations_leave_exactly_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..8).map(|_| s.spawn(|| Keyring::create(&path).map(|r| r.current().id().to_string()))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        assert_eq!(Keyring::load(&path).unwrap().unwrap().current().id(), winners[0]);
    }

    #[test]
    fn rotation_keeps_the_old_key_until_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let mut ring = Keyring::create(&path).unwrap();
        let old = ring.current().id().to_string();
        let new = ring.begin_rotation().unwrap().id().to_string();
        let mid = Keyring::load(&path).unwrap().unwrap();
        assert_eq!(mid.ids(), [new.as_str(), old.as_str()]);
        ring.finish_rotation().unwrap();
        assert_eq!(Keyring::load(&path).unwrap().unwrap().ids(), [new.as_str()]);
    }

    #[test]
    fn damaged_or_exposed_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        Keyring::create(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("panel-master-key-v1 mk_", "panel-master-key-v1 mk_0")).unwrap();
        let err = Keyring::load(&path).err().unwrap().to_string();
        assert!(err.contains("does not match its id"), "{err}");
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(Keyring::load(&path).err().unwrap().to_string().contains("line 1"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(Keyring::load(&path).err().unwrap().to_string().contains("chmod 600"));
        }
    }
}
