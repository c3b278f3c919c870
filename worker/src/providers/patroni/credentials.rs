//! A binding's credentials for a cluster: multi-host URLs that libpq (and drivers that follow it) use to find
//! the primary by themselves after a failover, and the members as endpoints.

//! Shared by the `ha` plan's engines (`ha_local`: one host, a port per member; `ha_ec2`: a host per member).

use serde_json::{Map, Value, json};

use crate::providers::Bound;

/// Where one member's Postgres listens.
#[derive(Debug, Clone, PartialEq)]
pub struct Address {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Members' addresses, the primary's first (connections try hosts in order).
pub struct Endpoints {
    pub primary: Address,
    pub replicas: Vec<Address>,
}

impl Endpoints {
    fn all(&self) -> impl Iterator<Item = &Address> + '_ {
        std::iter::once(&self.primary).chain(self.replicas.iter())
    }

    /// The OSB binding `endpoints`: one per member.
    pub fn osb(&self) -> Value {
        Value::Array(
            self.all()
                .map(
                    |a| json!({ "host": a.host, "ports": [a.port.to_string()], "protocol": "tcp" }),
                )
                .collect(),
        )
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `postgres://user:password@h:p1,h:p2,…/database?sslmode=require&target_session_attrs=<attrs>`.
fn url(endpoints: &Endpoints, database: &str, user: &str, password: &str, attrs: &str) -> String {
    let hosts: Vec<String> = endpoints.all().map(Address::to_string).collect();
    format!(
        "postgres://{}:{}@{}/{}?sslmode=require&target_session_attrs={attrs}",
        encode(user),
        encode(password),
        hosts.join(","),
        encode(database)
    )
}

/// A binding of `role` (with `access`, `read-only` or `read-write`) to `database`: the endpoints and role in its
/// details, multi-host URLs in its credentials.
pub fn bound(
    endpoints: &Endpoints,
    database: &str,
    (role, password, access): (&str, &str, &str),
    ca_pem: &str,
) -> Bound {
    Bound {
        details: json!({
            "endpoints": endpoints.osb(),
            "role": role,
            "database": database,
            "access": access,
        }),
        credentials: credentials(endpoints, database, role, password, ca_pem),
    }
}

pub fn credentials(
    endpoints: &Endpoints,
    database: &str,
    user: &str,
    password: &str,
    ca_pem: &str,
) -> Map<String, Value> {
    let read_write = url(endpoints, database, user, password, "read-write");
    let read_only = url(endpoints, database, user, password, "prefer-standby");
    let ports: Vec<String> = endpoints.all().map(|a| a.port.to_string()).collect();
    let hosts: Vec<&str> = endpoints.all().map(|a| a.host.as_str()).collect();
    let mut map = Map::new();
    let mut put = |k: &str, v: Value| {
        map.insert(k.into(), v);
    };
    put("DATABASE_URL", Value::String(read_write.clone()));
    put("uri", Value::String(read_write));
    put("DATABASE_READONLY_URL", Value::String(read_only));
    put("PGHOST", Value::String(hosts.join(",")));
    put("PGPORT", Value::String(ports.join(",")));
    put("PGDATABASE", Value::String(database.into()));
    put("PGUSER", Value::String(user.into()));
    put("PGPASSWORD", Value::String(password.into()));
    put("PGSSLMODE", Value::String("require".into()));
    put("PGTARGETSESSIONATTRS", Value::String("read-write".into()));
    put(
        "endpoints",
        json!({
            "primary": endpoints.primary.to_string(),
            "replicas": endpoints.replicas.iter().map(Address::to_string).collect::<Vec<_>>(),
        }),
    );
    put("ca_certificate", Value::String(ca_pem.into()));
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_list_every_member_primary_first() {
        let at = |port| Address {
            host: "127.0.0.1".into(),
            port,
        };
        let endpoints = Endpoints {
            primary: at(6002),
            replicas: vec![at(6001), at(6003)],
        };
        let creds = credentials(&endpoints, "app", "berth_bnd_1", "p@ss", "PEM");
        assert_eq!(
            creds["DATABASE_URL"],
            "postgres://berth_bnd_1:p%40ss@127.0.0.1:6002,127.0.0.1:6001,127.0.0.1:6003/app?sslmode=require&target_session_attrs=read-write"
        );
        assert!(
            creds["DATABASE_READONLY_URL"]
                .as_str()
                .unwrap()
                .ends_with("target_session_attrs=prefer-standby")
        );
        assert_eq!(creds["PGPORT"], "6002,6001,6003");
        assert_eq!(creds["endpoints"]["primary"], "127.0.0.1:6002");
        assert_eq!(endpoints.osb().as_array().unwrap().len(), 3);
    }
}
