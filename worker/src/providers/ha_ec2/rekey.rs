//! The re-key of a pooled cluster's Patroni passwords (docs/pools.md). Each cluster has a random re-key key K,
//! sealed in berth's secrets and written by cloud-init into each member's `/etc/berth/rekey.key` (root only). A
//! take draws a random nonce N and derives every role's new password as
//! `hex(HMAC-SHA256(K, "berth-rekey-v1" 0 N 0 role))`; berth sets them in Postgres and writes N into
//! `berth.rekey` in the same transaction, and the agent on every member (`rekey-agent.py`) derives the same
//! passwords from N once its Postgres has it (replicas through WAL), writes them into Patroni's configuration and
//! reloads it. Neither K (user-data) nor N (database) alone gives a password.

use broker::crypto::random_password;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::providers::patroni::Passwords;

/// The agent, installed by cloud-init as `/usr/local/sbin/berth-rekey`.
pub const AGENT: &str = include_str!("rekey-agent.py");
const LABEL: &[u8] = b"berth-rekey-v1";
/// Only the superuser reads it (a schema of its own in the `postgres` database; PUBLIC gets nothing).
pub const TABLE_SQL: &str = "CREATE SCHEMA IF NOT EXISTS berth; \
     REVOKE ALL ON SCHEMA berth FROM PUBLIC; \
     CREATE TABLE IF NOT EXISTS berth.rekey (id int PRIMARY KEY CHECK (id = 1), nonce text NOT NULL, \
     set_at timestamptz NOT NULL DEFAULT now()); \
     REVOKE ALL ON berth.rekey FROM PUBLIC";
pub const SET_NONCE_SQL: &str = "INSERT INTO berth.rekey (id, nonce) VALUES (1, $1) \
     ON CONFLICT (id) DO UPDATE SET nonce = EXCLUDED.nonce, set_at = now()";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new re-key key: 32 bytes from the OS RNG, as hex.
pub fn new_key() -> String {
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    hex(&key)
}

/// A take's nonce: alphanumeric, from the OS RNG.
pub fn new_nonce() -> String {
    random_password(32)
}

fn derive_one(key: &[u8], nonce: &str, role: &str) -> String {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in [LABEL, b"\0", nonce.as_bytes(), b"\0", role.as_bytes()] {
        mac.update(part);
    }
    hex(&mac.finalize().into_bytes())
}

/// The four Patroni passwords the agent derives from `key_hex` (a [`new_key`]) and `nonce`.
pub fn derive(key_hex: &str, nonce: &str) -> anyhow::Result<Passwords> {
    let key = (0..key_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(key_hex.get(i..i + 2).unwrap_or("x"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| anyhow::anyhow!("the cluster's re-key key is not hex"))?;
    Ok(Passwords {
        superuser: derive_one(&key, nonce, "superuser"),
        replication: derive_one(&key, nonce, "replication"),
        rewind: derive_one(&key, nonce, "rewind"),
        restapi: derive_one(&key, nonce, "restapi"),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn keys_and_nonces_are_random_and_passwords_alphanumeric() {
        let (key, other) = (new_key(), new_key());
        assert_eq!(key.len(), 64);
        assert_ne!(key, other);
        assert_ne!(new_nonce(), new_nonce());
        let a = derive(&key, "n1").unwrap();
        let b = derive(&key, "n2").unwrap();
        let c = derive(&other, "n1").unwrap();
        for p in [&a.superuser, &a.replication, &a.rewind, &a.restapi] {
            assert_eq!(p.len(), 64);
            assert!(p.chars().all(|ch| ch.is_ascii_alphanumeric()), "{p}");
        }
        let all = [&a.superuser, &a.replication, &a.rewind, &a.restapi];
        for (i, x) in all.iter().enumerate() {
            for y in &all[i + 1..] {
                assert_ne!(x, y, "roles get different passwords");
            }
        }
        assert_ne!(a.superuser, b.superuser, "another nonce, another password");
        assert_ne!(a.superuser, c.superuser, "another key, another password");
        assert_eq!(a.restapi, derive(&key, "n1").unwrap().restapi);
        assert!(derive("zz", "n1").is_err());
        assert!(derive("abc", "n1").is_err());
    }

    /// The agent on the VMs (Python) derives exactly what berth does.
    #[test]
    fn the_agent_derives_what_berth_derives() {
        let dir = std::env::temp_dir().join(format!("berth-rekey-{}", new_nonce()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("berth-rekey");
        std::fs::write(&script, AGENT).unwrap();
        let (key, nonce) = (new_key(), new_nonce());
        let mut child = std::process::Command::new("python3")
            .arg(&script)
            .args(["derive", &nonce])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs (the test machines have it)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(key.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(out.status.success());
        let from_agent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ours = derive(&key, &nonce).unwrap();
        assert_eq!(from_agent["superuser"], ours.superuser.as_str());
        assert_eq!(from_agent["replication"], ours.replication.as_str());
        assert_eq!(from_agent["rewind"], ours.rewind.as_str());
        assert_eq!(from_agent["restapi"], ours.restapi.as_str());
    }
}
