//! SCRAM-SHA-256 password verifiers (RFC 5802, RFC 7677) in the form Postgres stores in `pg_authid`:
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`. Every engine sends this instead of the
//! password in `CREATE/ALTER ROLE ... PASSWORD '...'` (as psql's `\password` does), so the plaintext never
//! travels in SQL text, where a server log (`log_statement`, or any failing statement) would keep it.

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use hmac::{Hmac, Mac};
use rand::{RngCore, rngs::OsRng};
use sha2::{Digest, Sha256};

/// What Postgres uses (`scram_iterations` default).
pub const ITERATIONS: u32 = 4096;
const SALT_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VerifierError {
    #[error("a password for a SCRAM verifier must be non-empty ASCII")]
    NotAscii,
}

/// `PASSWORD '<verifier>'` for `CREATE/ALTER ROLE`: the clause that sets `password` without sending it.
pub(crate) fn password_clause(password: &str) -> Result<String, crate::registry::TaskError> {
    let verifier =
        verifier(password).map_err(|e| crate::registry::TaskError::fatal(e.to_string()))?;
    Ok(format!(
        "PASSWORD {}",
        broker::names::quote_literal(&verifier)
    ))
}

/// The verifier of `password` with 16 fresh salt bytes from the OS RNG.
pub fn verifier(password: &str) -> Result<String, VerifierError> {
    let mut salt = [0u8; SALT_LEN];
    OsRng.fill_bytes(&mut salt);
    verifier_with(password, &salt, ITERATIONS)
}

/// The verifier of `password` for a given salt and iteration count.
pub fn verifier_with(
    password: &str,
    salt: &[u8],
    iterations: u32,
) -> Result<String, VerifierError> {
    // Postgres SASLprep's the password, and SASLprep of an ASCII string is that string (Postgres skips it for
    // pure ASCII). berth's passwords are generated alphanumerics; anything else is refused rather than
    // normalised differently from the server.
    if password.is_empty() || !password.is_ascii() {
        return Err(VerifierError::NotAscii);
    }
    let salted = salted_password(password.as_bytes(), salt, iterations);
    let client_key = hmac(&salted, b"Client Key");
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let server_key = hmac(&salted, b"Server Key");
    Ok(format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored_key),
        B64.encode(server_key)
    ))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA256 with one output block (32 bytes, the digest size): RFC 5802's Hi().
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut first = Vec::with_capacity(salt.len() + 4);
    first.extend_from_slice(salt);
    first.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &first);
    let mut result = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (r, b) in result.iter_mut().zip(u) {
            *r ^= b;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read from PostgreSQL 15's `pg_authid.rolpassword` after
    /// `SET password_encryption = 'scram-sha-256'; CREATE ROLE x PASSWORD 'pw'`.
    const POSTGRES_VERIFIER: &str = "SCRAM-SHA-256$4096:U9xZ4+KDW0APLhoMsPQBYA==$\
        2MxUbS9pQ7hOhr7cgkczdQQNJuro41loHdvZ35Jvsno=:f7xrmmVxcha/1FMt7voCZHk8bwDGjH1RlXPSQ06o8xQ=";

    #[test]
    fn reproduces_a_verifier_made_by_postgres() {
        let salt = B64.decode("U9xZ4+KDW0APLhoMsPQBYA==").unwrap();
        assert_eq!(verifier_with("pw", &salt, 4096).unwrap(), POSTGRES_VERIFIER);
        assert_ne!(verifier_with("pW", &salt, 4096).unwrap(), POSTGRES_VERIFIER);
    }

    #[test]
    fn fresh_verifiers_have_a_random_salt_and_postgres_iterations() {
        let (a, b) = (verifier("pw").unwrap(), verifier("pw").unwrap());
        assert_ne!(a, b);
        let parts: Vec<&str> = a.split('$').collect();
        assert_eq!(parts[0], "SCRAM-SHA-256");
        let (iterations, salt) = parts[1].split_once(':').unwrap();
        assert_eq!(iterations, "4096");
        assert_eq!(B64.decode(salt).unwrap().len(), 16);
    }

    #[test]
    fn non_ascii_or_empty_passwords_are_refused() {
        assert_eq!(verifier("pässword"), Err(VerifierError::NotAscii));
        assert_eq!(verifier(""), Err(VerifierError::NotAscii));
    }
}
