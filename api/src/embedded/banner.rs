//! What the embedded default prints once it serves: where it listens and how (plain HTTP, loopback only), the
//! credentials, and which plans of the catalog files it leaves out, each with what would add it.

use std::{net::SocketAddr, path::Path};

use broker::{
    catalog::{Engine, UnpublishedPlan},
    config::{Settings, on_path},
};

/// Plans left out for one reason: `service: plan, plan` and what to install or set for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingPlans {
    pub plans: String,
    pub hint: String,
}

/// Groups the unpublished plans by what would add them (several `s3` plans share one hint), in catalog order.
pub fn missing_plans(settings: &Settings, unpublished: &[UnpublishedPlan]) -> Vec<MissingPlans> {
    let mut out: Vec<(String, Vec<String>, String)> = Vec::new();
    for plan in unpublished {
        let hint = engine_hint(plan.engine, settings);
        match out
            .iter_mut()
            .find(|(service, _, h)| *service == plan.service && *h == hint)
        {
            Some((_, plans, _)) => plans.push(plan.plan.clone()),
            None => out.push((plan.service.clone(), vec![plan.plan.clone()], hint)),
        }
    }
    out.into_iter()
        .map(|(service, plans, hint)| MissingPlans {
            plans: format!("{service}: {}", plans.join(", ")),
            hint,
        })
        .collect()
}

const AWS_SETTINGS: &str = "AWS settings: AWS_REGION and credentials \
     (AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a role)";

/// What an operator installs or sets so that a plan on `engine` is served.
pub fn engine_hint(engine: Engine, settings: &Settings) -> String {
    engine_hint_with(engine, settings, on_path)
}

/// [`engine_hint`], with the look-up of programs on the PATH given (so tests need not change the PATH).
fn engine_hint_with(
    engine: Engine,
    settings: &Settings,
    installed: impl Fn(&str) -> bool,
) -> String {
    match engine {
        Engine::Shared => {
            "SHARED_POSTGRES_URL: a superuser URL of the Postgres server to host the databases"
                .into()
        }
        Engine::Local => {
            "LOCAL_ENGINE=on (needs the PostgreSQL server binaries: apt-get install postgresql)"
                .into()
        }
        Engine::HaLocal => {
            let absent: Vec<&str> = ["etcd", "patroni"]
                .into_iter()
                .filter(|program| !installed(program))
                .collect();
            let mut hints = Vec::new();
            if !absent.is_empty() {
                hints.push(format!(
                    "install etcd and Patroni: apt-get install etcd-server patroni (not on PATH: {})",
                    absent.join(", ")
                ));
            }
            if !settings.local_engine {
                hints.push("LOCAL_ENGINE=on".to_string());
            }
            hints.join(", and ")
        }
        Engine::Ec2 | Engine::HaEc2 => AWS_SETTINGS.into(),
        Engine::S3 => format!(
            "an S3-compatible store (S3_COMPATIBLE_ENDPOINT, S3_COMPATIBLE_ACCESS_KEY, \
             S3_COMPATIBLE_SECRET_KEY: SeaweedFS, MinIO, Garage, R2), or {AWS_SETTINGS}"
        ),
    }
}

/// Everything the banner says, for printing.
pub struct Banner<'a> {
    pub addr: SocketAddr,
    /// Whether the API serves TLS (the embedded default does not, unless configured).
    pub tls: bool,
    pub username: &'a str,
    pub password: &'a str,
    pub postgres_port: u16,
    pub postgres_data: &'a Path,
    pub missing: &'a [MissingPlans],
}

impl Banner<'_> {
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn text(&self) -> String {
        let url = self.url();
        let mut out = String::new();
        let mut line = |text: String| {
            out.push_str(&text);
            out.push('\n');
        };
        line(String::new());
        line("berth is running (embedded default)".into());
        line(format!("  broker URL: {url}"));
        line(format!("              {}", self.reach()));
        line(format!("  username:   {}", self.username));
        line(format!("  password:   {}", self.password));
        line(format!(
            "  Postgres:   127.0.0.1:{} (data in {})",
            self.postgres_port,
            self.postgres_data.display()
        ));
        line(format!(
            "  try:        curl -s -u '{}:{}' -H 'X-Broker-API-Version: 2.17' {url}/v2/catalog",
            self.username, self.password
        ));
        if !self.missing.is_empty() {
            line("  plans not served here, and what would add them:".into());
            for missing in self.missing {
                line(format!("    {}", missing.plans));
                line(format!("      {}", missing.hint));
            }
        }
        line("  running it for real (TLS, your own database, workers): docs/operations.md".into());
        line("Ctrl-C stops the API, the worker and the embedded Postgres.".into());
        line(String::new());
        out
    }

    /// Who can reach the API, and how: said plainly because the embedded default is for one machine.
    fn reach(&self) -> String {
        let transport = if self.tls {
            "HTTPS"
        } else {
            "plain HTTP (no TLS)"
        };
        if self.addr.ip().is_loopback() {
            format!(
                "{transport} on {}: only this machine can reach it",
                self.addr.ip()
            )
        } else {
            format!(
                "{transport} on {}: other machines can reach it (BIND_ADDRESS)",
                self.addr.ip()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker::catalog::unpublished_plans;
    use serde_json::json;

    /// The embedded default's settings without AWS or an S3 store, with the shipped catalog.
    fn embedded_settings() -> Settings {
        serde_json::from_value(json!({
            "plans_dir": concat!(env!("CARGO_MANIFEST_DIR"), "/../plans"),
            "shared_postgres_url": "postgres://postgres@127.0.0.1:5432/postgres",
            "local_engine": true,
        }))
        .unwrap()
    }

    fn banner_for(missing: &[MissingPlans]) -> String {
        Banner {
            addr: "127.0.0.1:8080".parse().unwrap(),
            tls: false,
            username: "berth",
            password: "pw",
            postgres_port: 5433,
            postgres_data: Path::new("/tmp/x"),
            missing,
        }
        .text()
    }

    #[test]
    fn the_banner_lists_each_missing_plan_with_what_would_add_it() {
        let settings = embedded_settings();
        let unpublished = unpublished_plans(&settings).unwrap();
        let missing = missing_plans(&settings, &unpublished);
        let text = banner_for(&missing);

        // Each missing plan's line, then the line saying what would add it.
        let hint_of = |plans: &str| {
            let lines: Vec<&str> = text.lines().collect();
            let at = lines
                .iter()
                .position(|l| l.trim() == plans)
                .unwrap_or_else(|| panic!("no line for {plans} in:\n{text}"));
            lines[at + 1].to_string()
        };
        assert!(hint_of("postgres: dedicated-spot").contains("AWS_REGION"));
        let s3 = hint_of("s3: basic, versioned, encrypted, encrypted-versioned");
        assert!(
            s3.contains("S3_COMPATIBLE_ENDPOINT") && s3.contains("AWS_REGION"),
            "{s3}"
        );
        // Served plans are not listed as missing.
        let listed: Vec<&str> = missing
            .iter()
            .flat_map(|m| m.plans.split([':', ',']).map(str::trim))
            .collect();
        assert!(
            !listed.contains(&"shared") && !listed.contains(&"dedicated"),
            "{listed:?}"
        );
        assert!(text.contains("plain HTTP (no TLS) on 127.0.0.1: only this machine can reach it"));
    }

    #[test]
    fn the_ha_hint_names_the_packages_missing_from_the_path_and_the_setting() {
        let mut settings = embedded_settings();
        let neither = engine_hint_with(Engine::HaLocal, &settings, |_| false);
        assert_eq!(
            neither,
            "install etcd and Patroni: apt-get install etcd-server patroni (not on PATH: etcd, patroni)"
        );
        let no_patroni = engine_hint_with(Engine::HaLocal, &settings, |p| p == "etcd");
        assert!(
            no_patroni.ends_with("(not on PATH: patroni)"),
            "{no_patroni}"
        );
        settings.local_engine = false;
        assert_eq!(
            engine_hint_with(Engine::HaLocal, &settings, |_| true),
            "LOCAL_ENGINE=on"
        );
        assert!(
            engine_hint_with(Engine::HaLocal, &settings, |_| false)
                .ends_with(", and LOCAL_ENGINE=on")
        );

        let text = banner_for(&[MissingPlans {
            plans: "postgres: ha".into(),
            hint: neither,
        }]);
        assert!(
            text.contains("    postgres: ha\n      install etcd and Patroni: apt-get install etcd-server patroni"),
            "{text}"
        );
    }

    #[test]
    fn a_banner_on_another_address_says_others_can_reach_it() {
        let text = Banner {
            addr: "0.0.0.0:8080".parse().unwrap(),
            tls: false,
            username: "berth",
            password: "pw",
            postgres_port: 5433,
            postgres_data: Path::new("/tmp/x"),
            missing: &[],
        }
        .text();
        assert!(text.contains("plain HTTP (no TLS) on 0.0.0.0: other machines can reach it"));
        assert!(!text.contains("plans not served here"));
    }
}
