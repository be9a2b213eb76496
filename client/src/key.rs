//! The payer's ed25519 key. On disk it is the 32-byte secret seed as hex, in a file
//! only its owner may read (mode 0600).

use std::fmt;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use rand::RngCore;

use crate::error::ClientError;

/// Environment variable that may hold the payer's seed as hex, instead of a key file.
pub const ENV_PAYER_KEY: &str = "X402_PAYER_KEY";

/// A payer's signing key. `Debug` and `Display` show only the public key; the secret
/// is zeroed when the key is dropped (ed25519-dalek's `zeroize` feature).
#[derive(Clone)]
pub struct PayerKey {
    signing: SigningKey,
}

impl PayerKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        let key = Self::from_seed(&seed);
        seed.fill(0);
        key
    }

    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(seed),
        }
    }

    /// Parses 64 hex characters (surrounding whitespace ignored, either case).
    pub fn from_hex_seed(hex_seed: &str) -> Result<Self, ClientError> {
        let mut seed = [0u8; 32];
        let parsed = hex::decode_to_slice(hex_seed.trim(), &mut seed);
        let key = parsed.map(|()| Self::from_seed(&seed));
        seed.fill(0);
        key.map_err(|_| ClientError::InvalidKey)
    }

    /// The key in `X402_PAYER_KEY`; [`ClientError::MissingKey`] when it is unset or empty.
    pub fn from_env() -> Result<Self, ClientError> {
        match std::env::var(ENV_PAYER_KEY) {
            Ok(value) if !value.trim().is_empty() => Self::from_hex_seed(&value),
            Ok(_) | Err(std::env::VarError::NotPresent) => Err(ClientError::MissingKey),
            Err(std::env::VarError::NotUnicode(_)) => Err(ClientError::InvalidKey),
        }
    }

    /// Reads a key file written by [`PayerKey::save`] (or `x402 keygen`). On unix a file
    /// that group or others may access is refused.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let read_err = |cause| ClientError::KeyRead {
            path: path.to_path_buf(),
            cause,
        };
        let metadata = std::fs::metadata(path).map_err(read_err)?;
        check_private(path, &metadata)?;
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Self::from_hex_seed(&text)
    }

    /// Writes the seed as hex to a new file with mode 0600. An existing file is never
    /// overwritten: losing a funded key loses its balance.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), ClientError> {
        let path = path.as_ref();
        let write_err = |cause: std::io::Error| {
            if cause.kind() == std::io::ErrorKind::AlreadyExists {
                ClientError::KeyExists {
                    path: path.to_path_buf(),
                }
            } else {
                ClientError::KeyWrite {
                    path: path.to_path_buf(),
                    cause,
                }
            }
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(write_err)?;
        let mut line = hex::encode(self.signing.to_bytes());
        line.push('\n');
        let written = file
            .write_all(line.as_bytes())
            .and_then(|()| file.sync_all());
        // Overwrite the heap copy of the secret before it is freed.
        line.clear();
        line.extend(std::iter::repeat_n('0', 65));
        written.map_err(write_err)
    }

    /// Lowercase hex of the public key, as registered with settlement and sent as `payer`.
    pub fn public_key_hex(&self) -> String {
        x402_proto::signing::public_key_hex(&self.signing)
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }
}

#[cfg(unix)]
fn check_private(path: &Path, metadata: &std::fs::Metadata) -> Result<(), ClientError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ClientError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path, _metadata: &std::fs::Metadata) -> Result<(), ClientError> {
    Ok(())
}

impl fmt::Debug for PayerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PayerKey")
            .field("public_key", &self.public_key_hex())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for PayerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.public_key_hex())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(std::path::PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            let mut suffix = [0u8; 8];
            OsRng.fill_bytes(&mut suffix);
            let dir =
                std::env::temp_dir().join(format!("x402-client-{tag}-{}", hex::encode(suffix)));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        pub(crate) fn path(&self, name: &str) -> std::path::PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const SEED_HEX: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";

    #[test]
    fn hex_seed_gives_the_rfc8032_public_key() {
        // RFC 8032 section 7.1, test 1.
        let key = PayerKey::from_hex_seed(SEED_HEX).unwrap();
        assert_eq!(
            key.public_key_hex(),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        assert_eq!(
            PayerKey::from_hex_seed(&format!("  {}\n", SEED_HEX.to_uppercase()))
                .unwrap()
                .public_key_hex(),
            key.public_key_hex()
        );
    }

    #[test]
    fn bad_seeds_are_refused_without_echoing_them() {
        for bad in [
            "",
            "abcd",
            &SEED_HEX[..62],
            &format!("{SEED_HEX}00"),
            &SEED_HEX.replace('9', "g"),
        ] {
            let err = PayerKey::from_hex_seed(bad).unwrap_err();
            assert!(matches!(err, ClientError::InvalidKey), "{bad}");
            assert!(!err.to_string().contains("9d61"));
        }
    }

    #[test]
    fn debug_and_display_never_show_the_secret() {
        let key = PayerKey::from_hex_seed(SEED_HEX).unwrap();
        for shown in [format!("{key:?}"), format!("{key}"), format!("{key:#?}")] {
            assert!(!shown.contains("9d61b19d"), "{shown}");
            assert!(shown.contains("d75a9801"), "{shown}");
        }
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            PayerKey::generate().public_key_hex(),
            PayerKey::generate().public_key_hex()
        );
    }

    #[test]
    fn save_then_load_round_trips_with_mode_0600() {
        let dir = TempDir::new("save");
        let path = dir.path("payer.key");
        let key = PayerKey::generate();
        key.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert_eq!(
            PayerKey::load(&path).unwrap().public_key_hex(),
            key.public_key_hex()
        );
    }

    #[test]
    fn save_never_overwrites() {
        let dir = TempDir::new("overwrite");
        let path = dir.path("payer.key");
        let first = PayerKey::generate();
        first.save(&path).unwrap();
        let err = PayerKey::generate().save(&path).unwrap_err();
        assert!(matches!(err, ClientError::KeyExists { .. }), "{err}");
        assert_eq!(
            PayerKey::load(&path).unwrap().public_key_hex(),
            first.public_key_hex()
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("perm");
        let path = dir.path("payer.key");
        PayerKey::generate().save(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o606] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = PayerKey::load(&path).unwrap_err();
            match &err {
                ClientError::KeyPermissions { mode: m, .. } => assert_eq!(*m, mode),
                other => panic!("mode {mode:o}: {other}"),
            }
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            PayerKey::load(&path).unwrap();
        }
    }

    #[test]
    fn a_missing_key_file_names_the_path() {
        let err = PayerKey::load("/nonexistent/dir/payer.key").unwrap_err();
        assert!(matches!(err, ClientError::KeyRead { .. }));
        assert!(err.to_string().contains("/nonexistent/dir/payer.key"));
    }
}
