//! Names of the resources berth makes, derived from OSB ids so a retry finds what the first try made.
//! A name is the prefix plus a hash of the id: valid as a Postgres identifier and an S3 bucket name,
//! and never shaped by anything a caller typed beyond the id.

use sha2::{Digest, Sha256};

/// Longest prefix we accept, so every derived name stays under Postgres' 63-byte identifier limit.
const MAX_PREFIX: usize = 20;

pub fn check_prefix(prefix: &str) -> anyhow::Result<()> {
    let ok = prefix.len() <= MAX_PREFIX
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !prefix.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        anyhow::bail!(
            "NAME_PREFIX must be at most {MAX_PREFIX} characters of a-z, 0-9 and _, not starting with a digit"
        );
    }
    Ok(())
}

/// 20 hex characters (80 bits) of SHA-256 of the id.
pub fn short_hash(id: &str) -> String {
    let digest = Sha256::digest(id.as_bytes());
    digest.iter().take(10).map(|b| format!("{b:02x}")).collect()
}

/// Database of a `shared` instance.
pub fn instance_database(prefix: &str, instance_id: &str) -> String {
    format!("{prefix}db_{}", short_hash(instance_id))
}

/// Role that owns a `shared` instance's database and everything in it.
pub fn instance_owner_role(prefix: &str, instance_id: &str) -> String {
    format!("{prefix}own_{}", short_hash(instance_id))
}

/// Folder of a `local` engine instance's server (under the servers folder).
pub fn instance_server(prefix: &str, instance_id: &str) -> String {
    format!("{prefix}srv_{}", short_hash(instance_id))
}

/// Folder of an `ha` instance's cluster on the `ha_local` engine (also its Patroni scope).
pub fn instance_cluster(prefix: &str, instance_id: &str) -> String {
    format!("{prefix}ha_{}", short_hash(instance_id))
}

/// Login role of one binding.
pub fn binding_role(prefix: &str, binding_id: &str) -> String {
    format!("{prefix}bnd_{}", short_hash(binding_id))
}

/// Bucket of an `s3` instance: the prefix (`_` as `-`) and the id's hash, 3-63 characters of a-z, 0-9 and
/// `-`, valid in every region. Prefixes S3 reserves (`xn--`, `sthree-`, `amzn-s3-demo-`) get a `b` in front.
pub fn bucket_name(prefix: &str, instance_id: &str) -> String {
    let name = format!("{}{}", prefix.replace('_', "-"), short_hash(instance_id));
    if ["xn--", "sthree-", "amzn-s3-demo-"]
        .iter()
        .any(|p| name.starts_with(p))
    {
        format!("b{name}")
    } else {
        name
    }
}

/// IAM user of one `s3` binding (64 characters at most, IAM's limit).
pub fn binding_user(prefix: &str, binding_id: &str) -> String {
    format!("{}bnd-{}", prefix.replace('_', "-"), short_hash(binding_id))
}

/// Quotes a Postgres identifier. Every name reaching SQL text goes through here.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a Postgres string literal (for the few statements that take no bind parameters, like CREATE ROLE).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_short() {
        let id = "a".repeat(500);
        let db = instance_database("berth_", &id);
        assert_eq!(db, instance_database("berth_", &id));
        assert!(db.len() <= 63, "{db}");
        assert_ne!(db, instance_database("berth_", "other"));
        assert!(binding_role(&"p".repeat(MAX_PREFIX), &id).len() <= 63);
    }

    #[test]
    fn bucket_names_are_valid_everywhere() {
        let name = bucket_name("berth_", "some-instance");
        assert!(name.starts_with("berth-") && name.len() <= 63, "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert!(bucket_name(&"p".repeat(MAX_PREFIX), "x").len() <= 63);
        assert!(bucket_name("xn__", "x").starts_with("bxn--"));
        assert!(binding_user(&"p".repeat(MAX_PREFIX), "x").len() <= 64);
    }

    #[test]
    fn quoting_escapes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("berth_").is_ok());
        assert!(check_prefix("").is_ok());
        assert!(check_prefix("Bad").is_err());
        assert!(check_prefix("1x").is_err());
        assert!(check_prefix("x;drop").is_err());
    }
}
