//! Secrets at rest and signatures: AES-256-GCM with a key from a file, HMAC-SHA256 for webhooks,
//! passwords from the OS RNG.

use std::{fmt, path::Path};

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, AeadCore, OsRng, Payload},
};
use anyhow::Context;
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use hmac::{Hmac, Mac};
use rand::{Rng, distributions::Alphanumeric};
use sha2::Sha256;

/// First byte of every sealed value, so the format can change without guessing. Format 1 (`1 | nonce | ct`)
/// names no key and is opened by trying each; format 2 (`2 | key id | nonce | ct`, the first two fields
/// authenticated as associated data) names the key it was sealed with.
const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;
const NONCE_LEN: usize = 12;
const KEY_ID_LEN: usize = 8;
const V2_HEADER: usize = 1 + KEY_ID_LEN;

/// A public fingerprint of a sealing key (8 bytes of an HMAC under it): names the key in sealed values, in
/// messages and in the database, and says nothing about the key. Derived from the key, so it cannot be
/// mislabelled.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; KEY_ID_LEN]);

impl KeyId {
    pub fn of(key: &[u8; 32]) -> Self {
        let mac = hmac_sha256(key, b"berth sealing key id v1");
        Self(mac[..KEY_ID_LEN].try_into().expect("8 bytes"))
    }

    pub fn as_bytes(&self) -> &[u8; KEY_ID_LEN] {
        &self.0
    }

    /// The id a format-2 sealed value names; `None` for format 1 (or anything shorter than a header).
    pub fn of_sealed(sealed: &[u8]) -> Option<Self> {
        (sealed.len() >= V2_HEADER && sealed[0] == FORMAT_V2)
            .then(|| Self(sealed[1..V2_HEADER].try_into().expect("8 bytes")))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// One key of a keyring: its id, its check value and its cipher.
struct RingKey {
    id: KeyId,
    check_value: [u8; 32],
    aead: Aes256Gcm,
    /// The key dashboard links are signed with, derived from this one (never the sealing key itself).
    link_key: [u8; 32],
}

/// What a dashboard link's key is derived for: a label of its own, so the derived key serves nothing else.
const LINK_KEY_LABEL: &[u8] = b"berth dashboard link key v1";

/// Seals and opens secrets stored in the broker's database with a keyring (`BERTH_KEY_FILES`): seals with the
/// primary (the first key), opens with whichever key a value names. Cheap to clone (the keys are shared).
#[derive(Clone)]
pub struct Cipher {
    keys: std::sync::Arc<Vec<RingKey>>,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| k.id))
            .finish()
    }
}

/// The setting that lists the broker's sealing keys, for messages.
pub const KEY_FILES_SETTING: &str = "BERTH_KEY_FILES";

impl Cipher {
    /// A keyring of one key.
    pub fn from_key(key: &[u8; 32]) -> Self {
        Self::from_keys(std::slice::from_ref(key)).expect("one key is a keyring")
    }

    /// A keyring whose primary is `keys[0]`. Fails on an empty list or a key listed twice.
    pub fn from_keys(keys: &[[u8; 32]]) -> anyhow::Result<Self> {
        anyhow::ensure!(!keys.is_empty(), "{KEY_FILES_SETTING} lists no key");
        let mut ring: Vec<RingKey> = Vec::with_capacity(keys.len());
        for key in keys {
            let id = KeyId::of(key);
            anyhow::ensure!(
                ring.iter().all(|k| k.id != id),
                "the key with id {id} is listed twice in {KEY_FILES_SETTING}"
            );
            ring.push(RingKey {
                id,
                check_value: key_check_value(key),
                aead: Aes256Gcm::new(key.into()),
                link_key: hmac_sha256(key, LINK_KEY_LABEL),
            });
        }
        Ok(Self {
            keys: std::sync::Arc::new(ring),
        })
    }

    /// Reads a key written by [`generate_key_file`].
    pub fn from_key_file(path: &Path) -> anyhow::Result<Self> {
        Ok(Self::from_key(&read_key_file(path)?))
    }

    /// Reads every key file of a list; the first is the primary.
    pub fn from_key_files(paths: &[std::path::PathBuf]) -> anyhow::Result<Self> {
        let keys = paths
            .iter()
            .map(|p| read_key_file(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Self::from_keys(&keys)
    }

    /// The id of the key new values are sealed with.
    pub fn primary_id(&self) -> KeyId {
        self.keys[0].id
    }

    /// Every key's id and check value, the primary first.
    pub fn key_checks(&self) -> Vec<(KeyId, [u8; 32])> {
        self.keys.iter().map(|k| (k.id, k.check_value)).collect()
    }

    pub fn holds(&self, id: KeyId) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let primary = &self.keys[0];
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let mut out = Vec::with_capacity(V2_HEADER + NONCE_LEN + plaintext.len() + 16);
        out.push(FORMAT_V2);
        out.extend_from_slice(primary.id.as_bytes());
        let ciphertext = primary
            .aead
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &out[..V2_HEADER],
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    pub fn open(&self, sealed: &[u8]) -> anyhow::Result<Vec<u8>> {
        match sealed.first() {
            Some(&FORMAT_V1) if sealed.len() > NONCE_LEN => {
                let nonce = Nonce::from_slice(&sealed[1..1 + NONCE_LEN]);
                self.keys
                    .iter()
                    .find_map(|k| k.aead.decrypt(nonce, &sealed[1 + NONCE_LEN..]).ok())
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "sealed secret (format 1, no key id) opens with none of the keys in                              {KEY_FILES_SETTING} (wrong keys or corrupted)"
                        )
                    })
            }
            Some(&FORMAT_V2) if sealed.len() >= V2_HEADER + NONCE_LEN => {
                let id = KeyId::of_sealed(sealed).expect("a format 2 header");
                let key = self.keys.iter().find(|k| k.id == id).ok_or_else(|| {
                    anyhow::anyhow!(
                        "sealed secret was sealed with key {id}, which this process does not hold: add the key                          file with id {id} to {KEY_FILES_SETTING}"
                    )
                })?;
                let nonce = Nonce::from_slice(&sealed[V2_HEADER..V2_HEADER + NONCE_LEN]);
                let payload = Payload {
                    msg: &sealed[V2_HEADER + NONCE_LEN..],
                    aad: &sealed[..V2_HEADER],
                };
                key.aead.decrypt(nonce, payload).map_err(|_| {
                    anyhow::anyhow!("sealed secret does not open with key {id} (corrupted)")
                })
            }
            _ => anyhow::bail!("sealed secret has an unknown format"),
        }
    }

    /// Whether `sealed` is sealed with the primary key in the current format (what `rekey` leaves behind).
    pub fn is_sealed_with_primary(&self, sealed: &[u8]) -> bool {
        KeyId::of_sealed(sealed) == Some(self.primary_id())
    }

    /// `sealed` opened and sealed again with the primary key.
    pub fn reseal(&self, sealed: &[u8]) -> anyhow::Result<Vec<u8>> {
        Ok(self.seal(&self.open(sealed)?))
    }

    /// HMAC-SHA256 of `message` under the primary key's link key (a dashboard link's signature).
    pub fn sign_link(&self, message: &[u8]) -> [u8; 32] {
        hmac_sha256(&self.keys[0].link_key, message)
    }

    /// Whether `tag` is [`Cipher::sign_link`] of `message` under any key of the ring: a link signed before a
    /// key rotation stays good while its key is listed, and dies with it.
    pub fn verify_link(&self, message: &[u8], tag: &[u8]) -> bool {
        self.keys.iter().fold(false, |good, k| {
            good | constant_time_eq(&hmac_sha256(&k.link_key, message), tag)
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

/// A format-1 value sealed with `key` (what berth wrote before key ids), for tests of old data.
#[doc(hidden)]
pub fn seal_v1(key: &[u8; 32], plaintext: &[u8]) -> Vec<u8> {
    let aead = Aes256Gcm::new(key.into());
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let ciphertext = aead
        .encrypt(&nonce, plaintext)
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    let mut out = vec![FORMAT_V1];
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    out
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
    fn a_keyring_seals_with_its_primary_and_opens_every_key_and_format() {
        let (a, b) = ([1; 32], [2; 32]);
        let old = Cipher::from_key(&a);
        let ring = Cipher::from_keys(&[b, a]).unwrap();
        assert_eq!(ring.primary_id(), KeyId::of(&b));
        // Format 1 (no id) opens by trying each key; format 2 by the key it names.
        let v1 = seal_v1(&a, b"one");
        assert_eq!(ring.open(&v1).unwrap(), b"one");
        let by_a = old.seal(b"two");
        assert_eq!(KeyId::of_sealed(&by_a), Some(KeyId::of(&a)));
        assert_eq!(ring.open(&by_a).unwrap(), b"two");
        assert!(!ring.is_sealed_with_primary(&by_a) && !ring.is_sealed_with_primary(&v1));
        let by_ring = ring.seal(b"three");
        assert!(ring.is_sealed_with_primary(&by_ring));
        assert_eq!(ring.open(&by_ring).unwrap(), b"three");
        let resealed = ring.reseal(&by_a).unwrap();
        assert!(ring.is_sealed_with_primary(&resealed));
        assert_eq!(Cipher::from_key(&b).open(&resealed).unwrap(), b"two");
    }

    #[test]
    fn a_value_sealed_with_a_key_not_held_names_the_key_and_the_setting() {
        let (a, b) = ([1; 32], [2; 32]);
        let sealed = Cipher::from_key(&a).seal(b"x");
        let err = Cipher::from_key(&b).open(&sealed).unwrap_err().to_string();
        let id = KeyId::of(&a).to_string();
        assert_eq!(id.len(), 16);
        assert!(
            err.contains(&id) && err.contains("BERTH_KEY_FILES"),
            "{err}"
        );
        assert!(Cipher::from_key(&b).open(&seal_v1(&a, b"x")).is_err());
        assert!(Cipher::from_keys(&[a, b, a]).is_err(), "a key listed twice");
        assert!(Cipher::from_keys(&[]).is_err());
    }

    #[test]
    fn the_key_id_in_a_sealed_value_is_authenticated() {
        let (a, b) = ([1; 32], [2; 32]);
        let ring = Cipher::from_keys(&[a, b]).unwrap();
        let mut sealed = ring.seal(b"x");
        // Relabelled as sealed by b: b does not open it.
        sealed[1..9].copy_from_slice(KeyId::of(&b).as_bytes());
        assert!(ring.open(&sealed).is_err());
        assert_ne!(
            KeyId::of(&a).as_bytes()[..],
            a[..8],
            "the id is not the key"
        );
    }

    #[test]
    fn key_lists_in_settings_name_the_primary_first_and_refuse_both_forms() {
        use crate::config::Settings;
        let settings =
            |value: serde_json::Value| -> Settings { serde_json::from_value(value).unwrap() };
        let listed = settings(serde_json::json!({
            "berth_key_files": " /k/new.key , /k/old.key,", "berth_data_dir": "/data",
        }));
        listed.check().unwrap();
        assert_eq!(
            listed.key_paths(),
            [std::path::PathBuf::from("/k/new.key"), "/k/old.key".into()]
        );
        assert_eq!(listed.key_path(), std::path::PathBuf::from("/k/new.key"));
        let default = settings(serde_json::json!({"berth_data_dir": "/data"}));
        assert_eq!(
            default.key_paths(),
            [std::path::PathBuf::from("/data/master.key")]
        );
        let both =
            settings(serde_json::json!({"berth_key_file": "/k/a", "berth_key_files": "/k/b"}));
        let err = both.check().unwrap_err().to_string();
        assert!(
            err.contains("BERTH_KEY_FILE ") && err.contains("BERTH_KEY_FILES"),
            "{err}"
        );
        let both = settings(
            serde_json::json!({"snapshot_key_file": "/k/a", "snapshot_key_files": "/k/b,/k/c"}),
        );
        let err = both.check().unwrap_err().to_string();
        assert!(err.contains("SNAPSHOT_KEY_FILES"), "{err}");
        let snapshots = settings(serde_json::json!({"snapshot_key_files": "/k/b,/k/c"}));
        assert_eq!(
            snapshots.snapshot_key_paths(),
            (vec!["/k/b".into(), "/k/c".into()], false)
        );
        // An empty single-key setting beside a list counts as unset (a process manager may only blank it).
        settings(serde_json::json!({"berth_key_file": "", "berth_key_files": "/k/b"}))
            .check()
            .unwrap();
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
