//! Dashboard links: `<public URL>/dashboard/instances/<id>?expires=<unix seconds>&sig=<base64url>`, opened in a
//! browser without the broker's credentials. The signature is an HMAC (a key derived from the sealing keys, see
//! [`Cipher::sign_link`]) over the instance id, the instance row's creation time and the expiry, so a link
//! works for that instance only, until it expires, and only while that row exists: an id deprovisioned and
//! provisioned again gets a new row, and the old links are refused.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use chrono::{DateTime, Utc};

use crate::crypto::Cipher;

/// The query of a dashboard link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkQuery {
    pub expires: i64,
    pub sig: String,
}

/// Why a link is refused (both are a 403: the link is not good, whatever the instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The signature does not match: the link was changed, or was made with a key the broker no longer holds.
    NotSigned,
    /// A good signature, past its expiry.
    Expired,
}

/// What is signed: each field on its own line (an instance id cannot hold a control character).
fn message(instance_id: &str, created_at: DateTime<Utc>, expires: i64) -> Vec<u8> {
    format!(
        "berth dashboard v1\n{instance_id}\n{}\n{expires}",
        created_at.timestamp_micros()
    )
    .into_bytes()
}

/// The signed query (`expires=…&sig=…`) of the instance's link, good until `expires` (unix seconds).
pub fn sign(
    cipher: &Cipher,
    instance_id: &str,
    created_at: DateTime<Utc>,
    expires: i64,
) -> LinkQuery {
    let tag = cipher.sign_link(&message(instance_id, created_at, expires));
    LinkQuery {
        expires,
        sig: B64URL.encode(tag),
    }
}

/// The whole link: `public_url` (with or without a path of its own) + the page's path + the signed query.
/// `None` when `public_url` is not an http(s) URL.
pub fn url(public_url: &str, instance_id: &str, query: &LinkQuery) -> Option<String> {
    let mut link = url::Url::parse(public_url).ok()?;
    if !matches!(link.scheme(), "http" | "https") {
        return None;
    }
    link.path_segments_mut()
        .ok()?
        .pop_if_empty()
        .extend(["dashboard", "instances", instance_id]);
    link.set_query(Some(&format!(
        "expires={}&sig={}",
        query.expires, query.sig
    )));
    Some(link.into())
}

/// Checks a link's query for the instance row (`created_at`) at `now`: the signature first, so a changed expiry
/// reads as a changed link, then the expiry.
pub fn verify(
    cipher: &Cipher,
    instance_id: &str,
    created_at: DateTime<Utc>,
    query: &LinkQuery,
    now: DateTime<Utc>,
) -> Result<(), Refusal> {
    let tag = B64URL.decode(&query.sig).map_err(|_| Refusal::NotSigned)?;
    if !cipher.verify_link(&message(instance_id, created_at, query.expires), &tag) {
        return Err(Refusal::NotSigned);
    }
    if now.timestamp() >= query.expires {
        return Err(Refusal::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).unwrap()
    }

    #[test]
    fn a_link_is_good_for_its_instance_row_until_it_expires() {
        let cipher = Cipher::from_key(&[3; 32]);
        let created = at(1_000);
        let query = sign(&cipher, "db-1", created, 5_000);
        assert_eq!(verify(&cipher, "db-1", created, &query, at(4_999)), Ok(()));
        assert_eq!(
            verify(&cipher, "db-1", created, &query, at(5_000)),
            Err(Refusal::Expired)
        );
        // Another instance, the same id provisioned again, a later expiry, another key: not signed.
        assert_eq!(
            verify(&cipher, "db-2", created, &query, at(2_000)),
            Err(Refusal::NotSigned)
        );
        assert_eq!(
            verify(&cipher, "db-1", at(1_001), &query, at(2_000)),
            Err(Refusal::NotSigned)
        );
        let longer = LinkQuery {
            expires: 9_000,
            ..query.clone()
        };
        assert_eq!(
            verify(&cipher, "db-1", created, &longer, at(6_000)),
            Err(Refusal::NotSigned)
        );
        let other = Cipher::from_key(&[4; 32]);
        assert_eq!(
            verify(&other, "db-1", created, &query, at(2_000)),
            Err(Refusal::NotSigned)
        );
        let garbage = LinkQuery {
            expires: 5_000,
            sig: "not base64!".into(),
        };
        assert_eq!(
            verify(&cipher, "db-1", created, &garbage, at(2_000)),
            Err(Refusal::NotSigned)
        );
    }

    #[test]
    fn links_signed_before_a_key_rotation_last_while_the_old_key_is_listed() {
        let (old, new) = ([5; 32], [6; 32]);
        let query = sign(&Cipher::from_key(&old), "db", at(0), 100);
        let ring = Cipher::from_keys(&[new, old]).unwrap();
        assert_eq!(verify(&ring, "db", at(0), &query, at(1)), Ok(()));
        let retired = Cipher::from_key(&new);
        assert_eq!(
            verify(&retired, "db", at(0), &query, at(1)),
            Err(Refusal::NotSigned)
        );
    }

    #[test]
    fn the_url_escapes_the_id_and_joins_the_public_url() {
        let query = LinkQuery {
            expires: 7,
            sig: "abc".into(),
        };
        assert_eq!(
            url("https://broker.example/", "a b/c", &query).unwrap(),
            "https://broker.example/dashboard/instances/a%20b%2Fc?expires=7&sig=abc"
        );
        assert_eq!(
            url("http://10.0.0.1:8080/berth", "db", &query).unwrap(),
            "http://10.0.0.1:8080/berth/dashboard/instances/db?expires=7&sig=abc"
        );
        assert_eq!(url("ftp://x/", "db", &query), None);
    }
}
