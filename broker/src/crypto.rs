//! Secrets at rest and signatures: AES-256-GCM with a key from a file, HMAC-SHA256 for webhooks,
//! passwords from the OS RNG.

use std::{fmt, path::Path};

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, AeadCore, OsRng},
};
use anyhow::Context;
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use hmac::{Hmac, Mac};
use rand::{Rng, distributions::Alphanumeric};
use sha2::Sha256;

/// First byte of every sealed value, so the format can change without guessing.
const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 12;

/// Seals and opens secrets stored in the broker's database. Cheap to clone (the key schedule is shared).
#[derive(Clone)]
pub struct Cipher {
    aead: std::sync::Arc<Aes256Gcm>,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cipher(..)")
    }
}

impl Cipher {
    pub fn from_key(key: &[u8; 32]) -> Self {
        Self {
            aead: std::sync::Arc::new(Aes256Gcm::new(key.into())),
        }
    }

    /// Reads a key written by [`generate_key_file`].
    pub fn from_key_file(path: &Path) -> anyhow::Result<Self> {
        Ok(Self::from_key(&read_key_file(path)?))
    }

    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = self
            .aead
            .encrypt(&nonce, plaintext)
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    pub fn open(&self, sealed: &[u8]) -> anyhow::Result<Vec<u8>> {
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != FORMAT_V1 {
            anyhow::bail!("sealed secret has an unknown format");
        }
        let nonce = Nonce::from_slice(&sealed[1..1 + NONCE_LEN]);
        self.aead
            .decrypt(nonce, &sealed[1 + NONCE_LEN..])
            .map_err(|_| {
                anyhow::anyhow!(
                    "sealed secret does not open with this key (wrong key or corrupted)"
                )
            })
    }

    pub fn seal_json<T: serde::Serialize>(&self, value: &T) -> Vec<u8> {
        self.seal(&serde_json::to_vec(value).expect("serializing to JSON in memory"))
    }

    pub fn open_json<T: serde::de::DeserializeOwned>(&self, sealed: &[u8]) -> anyhow::Result<T> {
        let bytes = self.open(sealed)?;
        serde_json::from_slice(&bytes).context("sealed secret is not the expected JSON")
    }
}

/// A value that tells whether two processes hold the same key, and helps nobody find it: HMAC-SHA256 of a
/// fixed label under a key derived from `key` (itself an HMAC under `key`). Stored in the broker's database.
pub fn key_check_value(key: &[u8; 32]) -> [u8; 32] {
    let derived = hmac_sha256(key, b"berth sealing key check: derive");
    hmac_sha256(&derived, b"berth sealing key check v1")
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// A key file that others may read (or, worse, write): a warning naming the file and the fix, or `None`.
/// Not a refusal: Kubernetes mounts secrets 0644 by default, where "others" are no one in the container.
pub fn key_file_permission_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "warning: the key file {} has mode {mode:04o}: users other than its owner may read it; \
             run `chmod 600 {}` (or set defaultMode: 0400 on a Kubernetes secret volume)",
            path.display(),
            path.display()
        )
    })
}

/// Reads a 32-byte key (base64 in a file) written by [`generate_key_file`].
pub fn read_key_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the key file {}", path.display()))?;
    let bytes = B64
        .decode(text.trim())
        .with_context(|| format!("the key file {} is not base64", path.display()))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("the key file {} must hold 32 bytes", path.display()))
}

/// Writes a fresh random key to `path` (mode 0600). Refuses to overwrite an existing key:
/// losing it would make every stored secret unreadable.
pub fn generate_key_file(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut key = [0u8; 32];
    OsRng.fill(&mut key);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} already exists; refusing to overwrite a key",
                path.display()
            )
        } else {
            anyhow::anyhow!("creating {}: {e}", path.display())
        }
    })?;
    writeln!(file, "{}", B64.encode(key))?;
    file.sync_all()?;
    Ok(())
}

/// A password of `len` alphanumeric characters from the OS RNG (about 5.95 bits each).
pub fn random_password(len: usize) -> String {
    OsRng
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// `base64(HMAC-SHA256(secret, body))`, the value of `X-OSB-Signature`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    B64.encode(mac.finalize().into_bytes())
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    // Hash first so the lengths leak nothing either.
    let (ha, hb) = (sha256(a), sha256(b));
    ha.ct_eq(&hb).into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trips_and_detects_tampering() {
        let cipher = Cipher::from_key(&[7; 32]);
        let sealed = cipher.seal(b"hunter2");
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(cipher.open(&sealed).unwrap(), b"hunter2");
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(cipher.open(&bad).is_err());
        assert!(Cipher::from_key(&[8; 32]).open(&sealed).is_err());
    }

    #[test]
    fn key_file_is_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("berth-key-{}", uuid::Uuid::new_v4()));
        let path = dir.join("master.key");
        generate_key_file(&path).unwrap();
        let first = std::fs::read(&path).unwrap();
        assert!(generate_key_file(&path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), first);
        let cipher = Cipher::from_key_file(&path).unwrap();
        assert_eq!(cipher.open(&cipher.seal(b"x")).unwrap(), b"x");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn passwords_are_random_and_alphanumeric() {
        let a = random_password(32);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, random_password(32));
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231 test case 2.
        let sig = sign(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            B64.encode(hex(
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
            ))
        );
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn key_check_values_tell_keys_apart_and_hide_them() {
        let a = key_check_value(&[7; 32]);
        assert_eq!(a, key_check_value(&[7; 32]));
        assert_ne!(a, key_check_value(&[8; 32]));
        assert_ne!(&a[..], &[7; 32][..]);
        assert_ne!(
            a,
            hmac_sha256(&[7; 32], b"berth sealing key check v1"),
            "under a derived key, not the key"
        );
    }

    #[test]
    fn a_key_file_readable_by_others_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("berth-key-{}", uuid::Uuid::new_v4()));
        let path = dir.join("master.key");
        generate_key_file(&path).unwrap();
        assert_eq!(
            key_file_permission_warning(&path),
            None,
            "generated keys are 0600"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warning = key_file_permission_warning(&path).expect("0644 is warned about");
        assert!(
            warning.contains(&path.display().to_string()) && warning.contains("chmod 600"),
            "{warning}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
