//! Which address a broker listens on: an interface hint
//! (`--interface default-route|hostname|IFNAME|CIDR`), resolved against
//! this host's interfaces; and which brokers share a host (they talk over
//! `ipc://` instead of TCP).

use crate::error::{BrokerError, NoAddress};
use std::net::{IpAddr, ToSocketAddrs};

/// An interface hint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hint {
    /// The address of the interface that holds the IPv4 default route.
    DefaultRoute,
    /// What this host's name resolves to (not loopback).
    Hostname,
    /// The first address (IPv4 first) of the interface with this name.
    Name(String),
    /// The first address of any interface inside this network.
    Cidr(IpAddr, u8),
}

impl std::str::FromStr for Hint {
    type Err = String;
    fn from_str(s: &str) -> Result<Hint, String> {
        let s = s.trim();
        match s {
            "" => Err(
                "an empty interface hint; use default-route, hostname, an interface name or a CIDR"
                    .into(),
            ),
            "default-route" => Ok(Hint::DefaultRoute),
            "hostname" => Ok(Hint::Hostname),
            _ if s.contains('/') => {
                let (ip, bits) = s.split_once('/').unwrap_or((s, ""));
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|_| format!("{s}: not a CIDR (expected e.g. 10.0.0.0/24)"))?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let bits: u8 = bits
                    .parse()
                    .ok()
                    .filter(|b| *b <= max)
                    .ok_or_else(|| format!("{s}: the prefix length must be 0 to {max}"))?;
                Ok(Hint::Cidr(ip, bits))
            }
            _ if s.len() <= 15 && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/') => {
                Ok(Hint::Name(s.to_string()))
            }
            _ => Err(format!(
                "{s}: not an interface name (at most 15 characters)"
            )),
        }
    }
}

impl std::fmt::Display for Hint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hint::DefaultRoute => f.write_str("default-route"),
            Hint::Hostname => f.write_str("hostname"),
            Hint::Name(n) => f.write_str(n),
            Hint::Cidr(ip, b) => write!(f, "{ip}/{b}"),
        }
    }
}

/// Whether `ip` lies in `net/bits`.
pub fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits as u32)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits as u32)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The interface of the IPv4 default route, from `/proc/net/route` text.
pub fn default_route_interface(route_table: &str) -> Option<String> {
    route_table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// This host's interface addresses: (interface, address).
pub fn addresses() -> Result<Vec<(String, IpAddr)>, BrokerError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(BrokerError::Interfaces)?;
    let mut out = Vec::new();
    for a in addrs {
        let Some(sa) = a.address else { continue };
        let ip = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        out.push((a.interface_name, ip));
    }
    // IPv4 first, each family in the kernel's order.
    out.sort_by_key(|(_, ip)| ip.is_ipv6());
    Ok(out)
}

/// Resolve `hint` to the address to listen on. `rank` names the broker in
/// errors.
pub fn resolve(hint: &Hint, rank: u32) -> Result<IpAddr, BrokerError> {
    let fail = |why: NoAddress| BrokerError::Interface {
        rank,
        hint: hint.to_string(),
        why,
    };
    let on = |name: &str| -> Result<Option<IpAddr>, BrokerError> {
        Ok(addresses()?
            .into_iter()
            .find(|(n, ip)| n == name && !is_link_local(*ip))
            .map(|(_, ip)| ip))
    };
    match hint {
        Hint::DefaultRoute => {
            let table = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
            let name =
                default_route_interface(&table).ok_or_else(|| fail(NoAddress::NoDefaultRoute))?;
            on(&name)?.ok_or_else(|| fail(NoAddress::DefaultRouteBare(name.clone())))
        }
        Hint::Name(name) => {
            let all = addresses()?;
            if !all.iter().any(|(n, _)| n == name) {
                let mut names: Vec<&str> = Vec::new();
                for (n, _) in &all {
                    if !names.contains(&n.as_str()) {
                        names.push(n);
                    }
                }
                return Err(fail(NoAddress::NoSuchInterface {
                    name: name.clone(),
                    have: names.join(", "),
                }));
            }
            on(name)?.ok_or_else(|| fail(NoAddress::InterfaceBare(name.clone())))
        }
        Hint::Cidr(net, bits) => addresses()?
            .into_iter()
            .map(|(_, ip)| ip)
            .find(|ip| in_cidr(*ip, *net, *bits))
            .ok_or_else(|| fail(NoAddress::NotInCidr(format!("{net}/{bits}")))),
        Hint::Hostname => {
            let name = hostname();
            let ips: Vec<IpAddr> = (name.as_str(), 0)
                .to_socket_addrs()
                .map_err(|e| fail(NoAddress::Unresolvable(name.clone(), e.to_string())))?
                .map(|a| a.ip())
                .collect();
            let mut ips: Vec<IpAddr> = ips.into_iter().filter(|ip| !ip.is_loopback()).collect();
            ips.sort_by_key(|ip| ip.is_ipv6());
            ips.into_iter()
                .next()
                .ok_or_else(|| fail(NoAddress::OnlyLoopback(name.clone())))
        }
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// A `tcp://` bind endpoint on `ip` with a port from the kernel.
pub fn tcp_endpoint(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("tcp://{v4}:*"),
        IpAddr::V6(v6) => format!("tcp://[{v6}]:*"),
    }
}

/// This host's name (short), or `localhost`.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The name `overlay status` shows for this broker's host: Slurm's node
/// name when a Slurm task (`SLURMD_NODENAME`: what squeue and sinfo show,
/// and the one name that differs between nodes that share a hostname),
/// else the hostname.
pub fn display_host() -> String {
    std::env::var("SLURMD_NODENAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(hostname)
}

/// Brokers with the same host id reach each other over `ipc://`: the same
/// kernel (boot id), network namespace and mount namespace (so the same
/// runtime directory).
pub fn host_id() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| hostname());
    let ns = |n: &str| {
        std::fs::read_link(format!("/proc/self/ns/{n}"))
            .ok()
            .and_then(|p| {
                let s = p.display().to_string();
                let start = s.find('[')? + 1;
                Some(s[start..s.len().saturating_sub(1)].to_string())
            })
            .unwrap_or_else(|| "-".into())
    };
    format!("{boot}:{}:{}", ns("net"), ns("mnt"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_parse() {
        assert_eq!("default-route".parse::<Hint>().unwrap(), Hint::DefaultRoute);
        assert_eq!("hostname".parse::<Hint>().unwrap(), Hint::Hostname);
        assert_eq!("eth0".parse::<Hint>().unwrap(), Hint::Name("eth0".into()));
        assert_eq!(
            "10.1.0.0/16".parse::<Hint>().unwrap(),
            Hint::Cidr("10.1.0.0".parse().unwrap(), 16)
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "nonsense/8",
            "a-very-long-interface-name",
        ] {
            assert!(bad.parse::<Hint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cidr_membership() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_cidr(ip("198.18.3.4"), ip("198.18.3.0"), 24));
        assert!(!in_cidr(ip("198.18.4.4"), ip("198.18.3.0"), 24));
        assert!(in_cidr(ip("1.2.3.4"), ip("0.0.0.0"), 0));
        assert!(in_cidr(ip("fd00::1"), ip("fd00::"), 8));
        assert!(!in_cidr(ip("fd00::1"), ip("10.0.0.0"), 8));
    }

    #[test]
    fn default_route_from_the_route_table() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 eth1\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_interface(t).as_deref(), Some("eth1"));
        assert_eq!(default_route_interface("Iface\n"), None);
    }

    #[test]
    fn a_hint_that_matches_nothing_names_the_rank_and_the_fix() {
        let err = resolve(&"203.0.113.0/24".parse().unwrap(), 5)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rank 5") && err.contains("--interface"),
            "{err}"
        );
        let err = resolve(&Hint::Name("nosuch0".into()), 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rank 2") && err.contains("no interface is called nosuch0"),
            "{err}"
        );
        // Loopback always exists.
        assert!(resolve(&Hint::Name("lo".into()), 0).unwrap().is_loopback());
    }
}
