//! `tuning_profile` → postgresql.conf settings, scaled to a modest server (a few GB of RAM shared with other
//! instances on the broker's machine), and the `berth.conf` file that carries them with the TLS and listen
//! settings. Shared by the dedicated-server engines (`local` writes the file itself, `ec2` through cloud-init).

use std::{collections::BTreeMap, path::Path};

/// The profiles the plan's schema offers.
pub const PROFILES: &[&str] = &["default", "oltp", "web", "analytics", "throwaway"];

/// Settings that only take effect after a restart (the rest are applied with a reload).
const NEEDS_RESTART: &[&str] = &[
    "shared_buffers",
    "max_connections",
    "wal_level",
    "max_wal_senders",
    "max_worker_processes",
    "listen_addresses",
    "port",
    "unix_socket_directories",
];

/// The settings of `profile` (an unknown name is the schema's job; it gets `default`'s).
pub fn settings(profile: &str) -> Vec<(&'static str, &'static str)> {
    let common = [
        ("checkpoint_completion_target", "0.9"),
        ("effective_io_concurrency", "200"),
        ("random_page_cost", "1.1"),
    ];
    let specific: &[(&str, &str)] = match profile {
        "oltp" => &[
            ("max_connections", "200"),
            ("shared_buffers", "256MB"),
            ("effective_cache_size", "768MB"),
            ("work_mem", "4MB"),
            ("maintenance_work_mem", "64MB"),
            ("max_wal_size", "2GB"),
            ("min_wal_size", "256MB"),
            ("wal_compression", "on"),
            ("wal_buffers", "16MB"),
            ("autovacuum_vacuum_scale_factor", "0.05"),
            ("autovacuum_analyze_scale_factor", "0.02"),
        ],
        "web" => &[
            ("max_connections", "300"),
            ("shared_buffers", "256MB"),
            ("effective_cache_size", "768MB"),
            ("work_mem", "2MB"),
            ("maintenance_work_mem", "64MB"),
            ("max_wal_size", "1GB"),
            ("idle_in_transaction_session_timeout", "5min"),
            ("wal_compression", "on"),
        ],
        "analytics" => &[
            ("max_connections", "40"),
            ("shared_buffers", "512MB"),
            ("effective_cache_size", "1536MB"),
            ("work_mem", "64MB"),
            ("maintenance_work_mem", "256MB"),
            ("max_wal_size", "4GB"),
            ("default_statistics_target", "500"),
            ("max_parallel_workers_per_gather", "2"),
            ("max_parallel_maintenance_workers", "2"),
            ("jit", "on"),
        ],
        "throwaway" => &[
            ("max_connections", "100"),
            ("shared_buffers", "128MB"),
            ("effective_cache_size", "512MB"),
            ("work_mem", "8MB"),
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("full_page_writes", "off"),
            ("wal_level", "minimal"),
            ("max_wal_senders", "0"),
            ("max_wal_size", "1GB"),
        ],
        _ => &[
            ("max_connections", "100"),
            ("shared_buffers", "128MB"),
            ("effective_cache_size", "512MB"),
            ("work_mem", "4MB"),
            ("maintenance_work_mem", "64MB"),
            ("max_wal_size", "1GB"),
        ],
    };
    common.iter().chain(specific).copied().collect()
}

/// `berth.conf`: listen on 127.0.0.1:`port` only (and the Unix socket in `socket_dir`, if any), TLS on with the generated certificate, scram passwords,
/// and the profile's settings. Included from postgresql.conf.
pub fn render(profile: &str, port: u16, socket_dir: Option<&Path>) -> String {
    render_listening(profile, "127.0.0.1", port, socket_dir)
}

/// [`render`] listening on `listen_addresses` (`*` on a VM of its own).
pub fn render_listening(
    profile: &str,
    listen_addresses: &str,
    port: u16,
    socket_dir: Option<&Path>,
) -> String {
    let mut out =
        String::from("# Written by berth: rewritten by every provision and update, do not edit.\n");
    let socket_dir = socket_dir
        .map(|d| d.display().to_string().replace('\'', "''"))
        .unwrap_or_default();
    let base: Vec<(&str, String)> = vec![
        ("listen_addresses", format!("'{listen_addresses}'")),
        ("port", port.to_string()),
        ("unix_socket_directories", format!("'{socket_dir}'")),
        ("ssl", "on".into()),
        ("ssl_cert_file", "'server.crt'".into()),
        ("ssl_key_file", "'server.key'".into()),
        ("ssl_min_protocol_version", "'TLSv1.2'".into()),
        ("password_encryption", "'scram-sha-256'".into()),
    ];
    for (key, value) in base {
        out.push_str(&format!("{key} = {value}\n"));
    }
    out.push_str(&format!("# tuning_profile: {profile}\n"));
    for (key, value) in settings(profile) {
        out.push_str(&format!("{key} = '{value}'\n"));
    }
    out
}

/// `key = value` lines of a berth.conf.
fn parse(conf: &str) -> BTreeMap<String, String> {
    conf.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// What going from config `old` to `new` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    Reload,
    Restart,
}

pub fn change(old: &str, new: &str) -> Change {
    let (old, new) = (parse(old), parse(new));
    if old == new {
        return Change::None;
    }
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let restart = keys
        .into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .any(|k| NEEDS_RESTART.contains(&k.as_str()));
    if restart {
        Change::Restart
    } else {
        Change::Reload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_renders_and_changes_are_classified() {
        let dir = Some(Path::new("/srv/x/data"));
        for profile in PROFILES {
            let conf = render(profile, 5555, dir);
            assert!(
                conf.contains("ssl = on") && conf.contains("port = 5555"),
                "{conf}"
            );
            assert_eq!(change(&conf, &conf), Change::None);
        }
        let default = render("default", 5555, dir);
        assert_eq!(
            change(&default, &render("analytics", 5555, dir)),
            Change::Restart
        );
        assert!(render("throwaway", 1, dir).contains("fsync = 'off'"));
        // default → web changes max_connections (restart); a work_mem-only difference reloads.
        let tweaked = default.replace("work_mem = '4MB'", "work_mem = '8MB'");
        assert_eq!(change(&default, &tweaked), Change::Reload);
    }
}
