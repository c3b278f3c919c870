//! The VM's cloud-init user-data, rendered from `cloud-init.yaml.j2` (kept in the repo, compiled in): mount the
//! data volume (formatting it only when it is blank), install the requested PostgreSQL from apt.postgresql.org,
//! write the tuning profile, TLS and pg_hba, start it, and create berth's superuser, the admin user and the app
//! database. Every value that reaches SQL or the script is an identifier the schema restricts to `[a-z0-9_]`,
//! a SCRAM verifier of a generated alphanumeric password, or a volume id; the rest goes through `tojson`.

use serde::Serialize;

use crate::providers::postgres::{scram, tuning};

const TEMPLATE: &str = include_str!("cloud-init.yaml.j2");

/// berth's own superuser on the VM, for bindings and the readiness probe (over TLS, with a generated password).
pub const SUPERUSER: &str = "berth_su";

#[derive(Debug, Serialize)]
pub struct UserData<'a> {
    pub instance_id: &'a str,
    /// The VM's name (`<prefix>pg-<hash>`): the TLS certificate's CN.
    pub server_name: &'a str,
    pub postgres_version: &'a str,
    pub volume_id: &'a str,
    pub tuning_profile: &'a str,
    pub app_db_name: &'a str,
    pub admin_user: &'a str,
    pub admin_password: &'a str,
    pub owner_role: &'a str,
    pub superuser_password: &'a str,
    pub extensions: &'a [String],
    pub ssh_keys: &'a [String],
}

impl std::fmt::Debug for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rendered(<user-data with passwords>)")
    }
}

/// Rendered user-data (it holds passwords: never logged).
pub struct Rendered(pub String);

pub fn render(data: &UserData<'_>) -> anyhow::Result<Rendered> {
    let safe = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    };
    for (what, value) in [
        ("postgres_version", data.postgres_version),
        ("volume id", data.volume_id),
        ("app_db_name", data.app_db_name),
        ("admin_user", data.admin_user),
        ("owner role", data.owner_role),
        ("admin password", data.admin_password),
        ("superuser password", data.superuser_password),
        ("server name", data.server_name),
    ] {
        anyhow::ensure!(
            safe(value),
            "{what} has characters the user-data cannot carry safely"
        );
    }
    anyhow::ensure!(
        data.extensions.iter().all(|e| safe(e)),
        "an extension name has characters the user-data cannot carry safely"
    );
    let postgresql_conf = tuning::render_listening(
        data.tuning_profile,
        "*",
        5432,
        Some(std::path::Path::new("/var/run/postgresql")),
    );
    let mut env = minijinja::Environment::new();
    env.set_keep_trailing_newline(true);
    env.add_template("cloud-init", TEMPLATE)?;
    let text = env
        .get_template("cloud-init")?
        .render(minijinja::context! {
            postgresql_conf => postgresql_conf.trim_end(),
            superuser => SUPERUSER,
            // The setup SQL sets the passwords as SCRAM verifiers: no password text a server log could keep.
            superuser_verifier => scram::verifier(data.superuser_password)?,
            admin_verifier => scram::verifier(data.admin_password)?,
            ..minijinja::Value::from_serialize(data)
        })?;
    Ok(Rendered(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(extensions: &'a [String], keys: &'a [String]) -> UserData<'a> {
        UserData {
            instance_id: "i-1",
            server_name: "bt-pg-0123",
            postgres_version: "17",
            volume_id: "vol-0123456789abcdef0",
            tuning_profile: "oltp",
            app_db_name: "shop",
            admin_user: "shop_admin",
            admin_password: "Adm1nPassw0rd",
            owner_role: "bt_own_abc",
            superuser_password: "SuPassw0rd",
            extensions,
            ssh_keys: keys,
        }
    }

    #[test]
    fn user_data_renders_a_complete_setup() {
        let extensions = vec!["pg_trgm".to_string(), "citext".to_string()];
        let keys = vec!["ssh-ed25519 AAAAC3Nza me@laptop".to_string()];
        let text = render(&sample(&extensions, &keys)).unwrap().0;
        assert!(text.starts_with("#cloud-config\n"), "{text}");
        for needle in [
            "ssh_authorized_keys:\n  - \"ssh-ed25519 AAAAC3Nza me@laptop\"",
            "VOLUME_ID=vol-0123456789abcdef0",
            "PGV=17",
            "apt-get install -y -q \"postgresql-$PGV\"",
            "mkfs.ext4 -q -L berthdata",
            "blkid \"$dev\" >/dev/null ||",
            "--data-checksums",
            "      listen_addresses = '*'\n",
            "      ssl = on\n",
            "      # tuning_profile: oltp\n      checkpoint_completion_target = '0.9'\n",
            "      max_connections = '200'\n",
            "hostssl  all  all       0.0.0.0/0     scram-sha-256",
            "ALTER ROLE berth_su WITH SUPERUSER LOGIN PASSWORD 'SCRAM-SHA-256$4096:",
            "ALTER ROLE shop_admin WITH LOGIN CREATEDB PASSWORD 'SCRAM-SHA-256$4096:",
            "GRANT bt_own_abc TO shop_admin;",
            "CREATE DATABASE shop OWNER bt_own_abc",
            "\\c shop\n      CREATE EXTENSION IF NOT EXISTS \"pg_trgm\";\n      CREATE EXTENSION IF NOT EXISTS \"citext\";\n",
            "systemctl enable --now berth-postgres",
            // An image with PostgreSQL baked in installs nothing (the VM emulator's, say).
            "if ! dpkg -s \"postgresql-$PGV\" >/dev/null 2>&1",
            // setup.sql is root's (0600): psql, run as postgres, reads it from its standard input.
            "-d postgres </etc/berth/setup.sql",
            "runcmd:\n  - [/usr/local/sbin/berth-setup]\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        // Passwords never in the user-data's SQL (nor anywhere in it).
        for password in ["SuPassw0rd", "Adm1nPassw0rd"] {
            assert!(!text.contains(password), "{password} in:\n{text}");
        }
        // Without ssh keys there is no key section; every line of a block stays inside it (YAML indentation).
        let plain = render(&sample(&[], &[])).unwrap().0;
        assert!(!plain.contains("ssh_authorized_keys"));
        assert!(!plain.contains("CREATE EXTENSION"));
        let in_blocks = plain
            .lines()
            .skip_while(|l| !l.starts_with("write_files:"))
            .skip(1);
        for line in in_blocks.take_while(|l| !l.starts_with("runcmd:")) {
            assert!(
                line.is_empty() || line.starts_with("  "),
                "a line escaped its block: {line:?}"
            );
        }
    }

    #[test]
    fn unsafe_values_are_refused() {
        let mut data = sample(&[], &[]);
        data.admin_password = "x'; DROP ROLE postgres; --";
        assert!(render(&data).is_err());
        let bad = vec!["pg_trgm\"; DROP".to_string()];
        assert!(render(&sample(&bad, &[])).is_err());
    }
}
