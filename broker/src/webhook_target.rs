//! Which addresses a webhook may call. A client names the URL, so without a policy it could make the worker
//! call the cloud metadata service or the broker's own machine. Refused always: link-local (169.254.0.0/16,
//! fe80::/10, where metadata services live), known metadata addresses and names, unspecified, broadcast and
//! multicast addresses. Refused unless `WEBHOOK_ALLOW_LOOPBACK`: loopback (127.0.0.0/8, ::1, `localhost`).
//! Private ranges stay allowed (platform controllers live there). `WEBHOOK_ALLOWED_TARGETS` (host names,
//! `.suffix` domains, IP addresses, CIDRs) narrows targets to those. IPv4-mapped IPv6 forms count as the IPv4
//! address. The API checks the URL as written; the worker checks every resolved address before it connects.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::Settings;

/// Host names of metadata services (compared lowercased, without a trailing dot).
const METADATA_NAMES: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
];

/// Metadata addresses outside link-local: AWS's IPv6 endpoint, Alibaba Cloud's.
const METADATA_ADDRESSES: &[IpAddr] = &[
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    /// A host name, exactly (lowercased).
    Name(String),
    /// `.example.com`: every name under that domain.
    Suffix(String),
    Network {
        base: IpAddr,
        prefix: u8,
    },
}

/// The operator's webhook target policy (see the module comment).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetPolicy {
    allow_loopback: bool,
    /// `None`: any target the fixed rules allow.
    allowed: Option<Vec<Allowed>>,
}

/// Why a target is refused; says which host, never the URL (it may carry a token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("webhook target {host} is refused: {reason}")]
pub struct Refused {
    pub host: String,
    pub reason: String,
}

impl TargetPolicy {
    /// From `WEBHOOK_ALLOW_LOOPBACK` and `WEBHOOK_ALLOWED_TARGETS`; fails naming a bad list entry.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        Self::new(
            settings.webhook_allow_loopback,
            settings.webhook_allowed_targets.as_deref(),
        )
    }

    /// `allowed_targets`: comma list of host names, `.domain` suffixes, IP addresses and CIDRs; blank = any.
    pub fn new(allow_loopback: bool, allowed_targets: Option<&str>) -> anyhow::Result<Self> {
        let entries: Vec<&str> = allowed_targets
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        let allowed = if entries.is_empty() {
            None
        } else {
            Some(
                entries
                    .into_iter()
                    .map(parse_entry)
                    .collect::<anyhow::Result<_>>()?,
            )
        };
        Ok(Self {
            allow_loopback,
            allowed,
        })
    }

    /// The check at request time, on the URL's host as written: a literal address is checked fully; a name
    /// is refused when it is a metadata or loopback name, or matches no allow-list entry while the list has
    /// no networks (a name in an allowed network can only be told after resolving, at delivery).
    pub fn check_url(&self, url: &url::Url) -> Result<(), Refused> {
        match url.host() {
            None => Err(refused("(none)", "the URL has no host")),
            Some(url::Host::Ipv4(ip)) => self.check_address(&ip.to_string(), None, IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_address(&ip.to_string(), None, IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => {
                let name = normalize(name);
                self.check_name(&name)?;
                match &self.allowed {
                    Some(list)
                        if !self.name_listed(&name)
                            && !list.iter().any(|a| matches!(a, Allowed::Network { .. })) =>
                    {
                        Err(refused(&name, "it is not on WEBHOOK_ALLOWED_TARGETS"))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// The check at delivery time: `host` as in the URL and every address it resolved to; connect only to
    /// addresses checked here.
    pub fn check_resolved(
        &self,
        host: &url::Host<&str>,
        addresses: &[IpAddr],
    ) -> Result<(), Refused> {
        let name = match host {
            url::Host::Domain(name) => {
                let name = normalize(name);
                self.check_name(&name)?;
                Some(name)
            }
            url::Host::Ipv4(_) | url::Host::Ipv6(_) => None,
        };
        let shown = name.clone().unwrap_or_else(|| host.to_string());
        if addresses.is_empty() {
            return Err(refused(&shown, "it resolved to no address"));
        }
        for &address in addresses {
            self.check_address(&shown, name.as_deref(), address)?;
        }
        Ok(())
    }

    fn check_name(&self, name: &str) -> Result<(), Refused> {
        if METADATA_NAMES.contains(&name) {
            return Err(refused(name, "it names a cloud metadata service"));
        }
        if (name == "localhost" || name.ends_with(".localhost")) && !self.allow_loopback {
            return Err(refused(name, LOOPBACK));
        }
        Ok(())
    }

    /// `name`: the host name the address came from, if any (an allow-listed name allows its addresses).
    fn check_address(
        &self,
        shown: &str,
        name: Option<&str>,
        address: IpAddr,
    ) -> Result<(), Refused> {
        let address = unmapped(address);
        if let Some(reason) = always_refused(address) {
            return Err(refused(shown, &format!("{address} is {reason}")));
        }
        if address.is_loopback() && !self.allow_loopback {
            return Err(refused(shown, &format!("{address}: {LOOPBACK}")));
        }
        if let Some(list) = &self.allowed {
            let by_name = name.is_some_and(|n| self.name_listed(n));
            let by_network = list.iter().any(|a| match *a {
                Allowed::Network { base, prefix } => in_network(address, base, prefix),
                _ => false,
            });
            if !by_name && !by_network {
                return Err(refused(
                    shown,
                    &format!("{address} is not on WEBHOOK_ALLOWED_TARGETS"),
                ));
            }
        }
        Ok(())
    }

    fn name_listed(&self, name: &str) -> bool {
        self.allowed.iter().flatten().any(|a| match a {
            Allowed::Name(n) => n == name,
            Allowed::Suffix(s) => name.ends_with(s.as_str()),
            Allowed::Network { .. } => false,
        })
    }
}

const LOOPBACK: &str = "loopback targets are refused unless WEBHOOK_ALLOW_LOOPBACK is on";

fn refused(host: &str, reason: &str) -> Refused {
    Refused {
        host: host.to_string(),
        reason: reason.to_string(),
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `::ffff:a.b.c.d` is the IPv4 address a.b.c.d (a socket connects to that).
fn unmapped(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

fn always_refused(address: IpAddr) -> Option<&'static str> {
    if METADATA_ADDRESSES.contains(&address) {
        return Some("a cloud metadata address");
    }
    match address {
        IpAddr::V4(v4) => {
            if v4.is_link_local() {
                Some("link-local (where cloud metadata services live)")
            } else if v4.octets()[0] == 0 {
                Some("unspecified (0.0.0.0/8)")
            } else if v4.is_broadcast() || v4.is_multicast() {
                Some("not a unicast address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                Some("unspecified (::)")
            } else if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                Some("link-local (fe80::/10)")
            } else if v6.is_multicast() {
                Some("not a unicast address")
            } else {
                None
            }
        }
    }
}

fn in_network(address: IpAddr, base: IpAddr, prefix: u8) -> bool {
    match (address, base) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

fn parse_entry(entry: &str) -> anyhow::Result<Allowed> {
    let bad = || {
        anyhow::anyhow!(
            "WEBHOOK_ALLOWED_TARGETS: {entry:?} is not a host name, .domain, IP address or CIDR"
        )
    };
    if let Some((base, prefix)) = entry.split_once('/') {
        let base: IpAddr = base.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if base.is_ipv4() { 32 } else { 128 };
        anyhow::ensure!(prefix <= max, bad());
        return Ok(Allowed::Network {
            base: unmapped(base),
            prefix,
        });
    }
    if let Ok(ip) = entry
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<IpAddr>()
    {
        let ip = unmapped(ip);
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        return Ok(Allowed::Network { base: ip, prefix });
    }
    let name = normalize(entry);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    match name.strip_prefix('.') {
        Some(domain) if domain.split('.').all(label_ok) => {
            Ok(Allowed::Suffix(format!(".{domain}")))
        }
        None if name.split('.').all(label_ok) => Ok(Allowed::Name(name)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(policy: &TargetPolicy, url: &str) -> Result<(), Refused> {
        policy.check_url(&url::Url::parse(url).unwrap())
    }

    fn resolved(policy: &TargetPolicy, host: &str, addresses: &[&str]) -> Result<(), Refused> {
        let addresses: Vec<IpAddr> = addresses.iter().map(|a| a.parse().unwrap()).collect();
        policy.check_resolved(&url::Host::Domain(host), &addresses)
    }

    #[test]
    fn metadata_link_local_and_unspecified_are_always_refused() {
        let open = TargetPolicy::new(true, None).unwrap();
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://169.254.170.2/v2/credentials",
            "http://[fe80::1]/",
            "http://[fd00:ec2::254]/",
            "http://100.100.100.200/",
            "http://0.0.0.0:8080/",
            "http://[::]/",
            "http://[::ffff:169.254.169.254]/",
            "http://255.255.255.255/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://METADATA.google.internal./",
            "http://metadata/",
        ] {
            let err = check(&open, url).expect_err(url);
            assert!(
                !err.to_string().contains("/latest"),
                "the refusal shows the path: {err}"
            );
        }
        assert!(resolved(&open, "hooks.example", &["10.0.0.5", "169.254.169.254"]).is_err());
    }

    #[test]
    fn loopback_needs_the_setting() {
        let closed = TargetPolicy::new(false, None).unwrap();
        let open = TargetPolicy::new(true, None).unwrap();
        for url in [
            "http://127.0.0.1:9/hook",
            "http://127.5.5.5/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            // Numeric forms the URL parser turns into 127.0.0.1.
            "http://2130706433/",
            "http://0x7f.1/",
            "http://localhost:8080/",
            "http://app.localhost/",
        ] {
            assert!(check(&closed, url).is_err(), "{url}");
            assert_eq!(check(&open, url), Ok(()), "{url}");
        }
        assert!(resolved(&closed, "hooks.example", &["127.0.0.1"]).is_err());
        assert_eq!(resolved(&open, "hooks.example", &["127.0.0.1"]), Ok(()));
    }

    #[test]
    fn private_and_public_addresses_are_allowed_by_default() {
        let policy = TargetPolicy::default();
        for url in [
            "http://10.1.2.3/",
            "http://192.168.0.10:8080/x",
            "https://[fd12::1]/",
            "https://hooks.example/x",
            "https://203.0.113.9/",
        ] {
            assert_eq!(check(&policy, url), Ok(()), "{url}");
        }
    }

    #[test]
    fn the_allow_list_narrows_targets() {
        let policy = TargetPolicy::new(
            false,
            Some("hooks.example, .corp.example,10.20.0.0/16, 2001:db8::/32"),
        )
        .unwrap();
        for url in [
            "https://hooks.example/x",
            "https://ci.corp.example/x",
            "http://10.20.3.4/",
            "http://[2001:db8::7]/",
            // A name might resolve into an allowed network: decided at delivery.
            "https://elsewhere.example/",
        ] {
            assert_eq!(check(&policy, url), Ok(()), "{url}");
        }
        for url in [
            "http://10.21.0.1/",
            "http://203.0.113.9/",
            "http://[2001:db9::1]/",
        ] {
            assert!(check(&policy, url).is_err(), "{url}");
        }
        assert_eq!(
            resolved(&policy, "elsewhere.example", &["10.20.0.9"]),
            Ok(())
        );
        assert!(resolved(&policy, "elsewhere.example", &["10.20.0.9", "10.30.0.1"]).is_err());
        assert_eq!(
            resolved(&policy, "hooks.example", &["198.51.100.1"]),
            Ok(())
        );
        // Listed names still never reach forbidden addresses.
        assert!(resolved(&policy, "hooks.example", &["169.254.169.254"]).is_err());
        assert!(resolved(&policy, "hooks.example", &["127.0.0.1"]).is_err());

        let names_only = TargetPolicy::new(false, Some("hooks.example")).unwrap();
        assert!(check(&names_only, "https://other.example/").is_err());
        assert!(check(&names_only, "https://10.0.0.1/").is_err());
        assert_eq!(check(&names_only, "https://HOOKS.example./x"), Ok(()));
    }

    #[test]
    fn settings_with_a_bad_list_do_not_load() {
        let settings = |list: &str| -> Settings {
            serde_json::from_value(serde_json::json!({ "webhook_allowed_targets": list })).unwrap()
        };
        let err = settings("hooks.example,10.0.0.0/99").check().unwrap_err();
        assert!(err.to_string().contains("WEBHOOK_ALLOWED_TARGETS"), "{err}");
        assert!(settings("hooks.example,10.0.0.0/8").check().is_ok());
        let defaults: Settings = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(
            TargetPolicy::from_settings(&defaults).unwrap(),
            TargetPolicy::default()
        );
    }

    #[test]
    fn bad_list_entries_are_refused() {
        for entry in [
            "10.0.0.0/33",
            "::/129",
            "bad host",
            "*.example",
            "10.0.0.0/x",
        ] {
            assert!(TargetPolicy::new(false, Some(entry)).is_err(), "{entry}");
        }
        assert_eq!(
            TargetPolicy::new(false, Some(" , ")).unwrap(),
            TargetPolicy::default()
        );
    }
}
