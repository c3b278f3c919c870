//! The start-up check of the master key list against a real database (docs/keys.md): what it records, what it
//! refuses and why, and how retirement follows the order keys were first seen.

use std::path::{Path, PathBuf};

use broker::{
    crypto::{Cipher, KeyId, generate_key_file, read_key_file, seal_v1},
    db::key_checks::{MASTER_KEY, recorded, retire_all_but, verify_master_keys},
};
use sqlx::PgPool;

struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("berth-keychecks-{}", uuid::Uuid::new_v4()));
        Self { dir }
    }

    /// A key file named `name` (made on first use).
    fn file(&self, name: &str) -> PathBuf {
        let path = self.dir.join(name);
        if !path.exists() {
            generate_key_file(&path).unwrap();
        }
        path
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn id(path: &Path) -> String {
    KeyId::of(&read_key_file(path).unwrap()).to_string()
}

async fn refusal(pool: &PgPool, paths: &[PathBuf]) -> String {
    verify_master_keys(pool, paths)
        .await
        .expect_err("refused")
        .to_string()
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_list_is_recorded_and_every_key_still_in_use_must_stay_listed(pool: PgPool) {
    let keys = Keys::new();
    let (a, b, c) = (keys.file("a.key"), keys.file("b.key"), keys.file("c.key"));
    verify_master_keys(&pool, std::slice::from_ref(&a))
        .await
        .unwrap();
    // Step 2 of a rotation: B listed second; then first.
    verify_master_keys(&pool, &[a.clone(), b.clone()])
        .await
        .unwrap();
    verify_master_keys(&pool, &[b.clone(), a.clone()])
        .await
        .unwrap();
    let ids: Vec<String> = recorded(&pool, MASTER_KEY)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.key_id)
        .collect();
    assert_eq!(ids, [id(&a), id(&b)]);

    // B alone is refused while A is not retired: the message names A's id and the setting.
    let said = refusal(&pool, std::slice::from_ref(&b)).await;
    assert!(
        said.contains(&id(&a)) && said.contains("BERTH_KEY_FILES"),
        "{said}"
    );
    // A refused process records nothing: C is not "in use" after its refusal.
    let said = refusal(&pool, &[c.clone(), b.clone()]).await;
    assert!(said.contains(&id(&a)), "{said}");
    assert_eq!(recorded(&pool, MASTER_KEY).await.unwrap().len(), 2);

    // The next rotation's key, listed second before rekey runs, is first seen after B: not retired with A.
    verify_master_keys(&pool, &[b.clone(), a.clone(), c.clone()])
        .await
        .unwrap();
    assert_eq!(
        retire_all_but(&pool, MASTER_KEY, &id(&b)).await.unwrap(),
        [id(&a)]
    );
    verify_master_keys(&pool, &[b.clone(), c.clone()])
        .await
        .unwrap();
    // A retired key may not come back as primary.
    let said = refusal(&pool, &[a.clone(), b.clone(), c.clone()]).await;
    assert!(said.contains(&id(&a)) && said.contains("retired"), "{said}");
    // C as primary is fine.
    verify_master_keys(&pool, &[c.clone(), b.clone()])
        .await
        .unwrap();
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_recorded_id_with_another_check_value_is_refused(pool: PgPool) {
    let keys = Keys::new();
    let a = keys.file("a.key");
    verify_master_keys(&pool, std::slice::from_ref(&a))
        .await
        .unwrap();
    // What a colliding id would look like: the id recorded with another key's check value.
    sqlx::query("UPDATE sealing_keys SET check_value = $1")
        .bind(&broker::crypto::key_check_value(&[9; 32])[..])
        .execute(&pool)
        .await
        .unwrap();
    let said = refusal(&pool, std::slice::from_ref(&a)).await;
    assert!(
        said.contains(&id(&a)) && said.contains(&a.display().to_string()),
        "{said}"
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_database_of_the_previous_release_adopts_its_key_by_check_value(pool: PgPool) {
    let keys = Keys::new();
    let (a, b) = (keys.file("a.key"), keys.file("b.key"));
    let key_a = read_key_file(&a).unwrap();
    // The previous release: one check value, secrets in format 1, no sealing_keys rows.
    sqlx::query("INSERT INTO sealing_key_checks (name, check_value) VALUES ('master', $1)")
        .bind(&broker::crypto::key_check_value(&key_a)[..])
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO webhook_deliveries (id, task_id, url, secret, body) VALUES ($1, $1, 'http://x', $2, '{}')")
        .bind(uuid::Uuid::new_v4())
        .bind(seal_v1(&key_a, b"s"))
        .execute(&pool)
        .await
        .unwrap();
    let said = refusal(&pool, std::slice::from_ref(&b)).await;
    assert!(said.contains(&b.display().to_string()), "{said}");
    assert!(
        recorded(&pool, MASTER_KEY).await.unwrap().is_empty(),
        "nothing recorded on refusal"
    );
    // Upgrading with the new key listed first already: A is adopted first, so a rekey with B retires it.
    verify_master_keys(&pool, &[b.clone(), a.clone()])
        .await
        .unwrap();
    assert_eq!(
        retire_all_but(&pool, MASTER_KEY, &id(&b)).await.unwrap(),
        [id(&a)]
    );
    let ring = Cipher::from_key_files(&[b, a]).unwrap();
    let sealed: Vec<u8> = sqlx::query_scalar("SELECT secret FROM webhook_deliveries")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(ring.open(&sealed).unwrap(), b"s");
}
