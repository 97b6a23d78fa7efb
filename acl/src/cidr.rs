//! IPv4 and IPv6 networks in CIDR notation.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A network such as `10.0.0.0/8` or `fd00::/8`. A bare address is a
/// single host (`/32` or `/128`). Host bits must be zero: `10.0.0.1/8` is
/// refused as a likely typo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an ip address; write a network such as 10.0.0.0/8 or fd00::/8")]
    Address(String),
    #[error(
        "{0:?} has a bad prefix length; write 0 to 32 after the '/' for ipv4, 0 to 128 for ipv6"
    )]
    Prefix(String),
    #[error("{text:?} has host bits set; write the network address {fixed}")]
    HostBits { text: String, fixed: String },
}

fn mask_v4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// The address with IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) turned
/// into plain IPv4, as a dual-stack socket may report them.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Parse an address as a ZAP handler receives it, leniently: surrounding
/// whitespace and `[...]` brackets are dropped, and so is an IPv6 zone
/// (`%eth0`). Anything else that does not parse (an empty string for ipc,
/// a path) gives `None`.
pub fn parse_address(text: &str) -> Option<IpAddr> {
    let t = text.trim();
    let t = t
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(t);
    let t = t.split_once('%').map_or(t, |(a, _)| a);
    t.parse::<IpAddr>().ok().map(canonical_ip)
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical_ip(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let m = mask_v4(self.prefix);
                u32::from(ip) & m == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let m = mask_v6(self.prefix);
                u128::from(ip) & m == u128::from(net)
            }
            _ => false,
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let (a, p) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| CidrError::Address(text.to_owned()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| CidrError::Prefix(text.to_owned()))?,
            Some(_) => return Err(CidrError::Prefix(text.to_owned())),
        };
        let network = match addr {
            IpAddr::V4(v) => IpAddr::V4((u32::from(v) & mask_v4(prefix)).into()),
            IpAddr::V6(v) => IpAddr::V6((u128::from(v) & mask_v6(prefix)).into()),
        };
        if network != addr {
            return Err(CidrError::HostBits {
                text: text.to_owned(),
                fixed: format!("{network}/{prefix}"),
            });
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_edges() {
        let n = c("10.1.0.0/16");
        assert!(n.contains(ip("10.1.0.0")));
        assert!(n.contains(ip("10.1.255.255")));
        assert!(!n.contains(ip("10.0.255.255")));
        assert!(!n.contains(ip("10.2.0.0")));
        assert!(c("0.0.0.0/0").contains(ip("255.255.255.255")));
        assert!(c("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!c("192.0.2.7").contains(ip("192.0.2.8")));
        // IPv4-mapped IPv6 is treated as IPv4; other families never match.
        assert!(n.contains(ip("::ffff:10.1.2.3")));
        assert!(!n.contains(ip("fd00::1")));
    }

    #[test]
    fn v6_edges() {
        let n = c("fd00::/8");
        assert!(n.contains(ip("fd00::")));
        assert!(n.contains(ip("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!n.contains(ip("fe00::")));
        assert!(!n.contains(ip("fc00::1")));
        assert!(c("::/0").contains(ip("2001:db8::1")));
        assert!(!c("::/0").contains(ip("10.0.0.1")));
        assert!(c("2001:db8::1/128").contains(ip("2001:db8::1")));
        assert_eq!(c("2001:db8::/32").to_string(), "2001:db8::/32");
    }

    #[test]
    fn bad_networks() {
        let e = |s: &str| s.parse::<Cidr>().unwrap_err();
        assert!(matches!(e("10.0.0.0/33"), CidrError::Prefix(_)));
        assert!(matches!(e("fd00::/129"), CidrError::Prefix(_)));
        assert!(matches!(e("10.0.0.0/"), CidrError::Prefix(_)));
        assert!(matches!(e("10.0.0.0/+8"), CidrError::Prefix(_)));
        assert!(matches!(e("10.0.0.0/8/8"), CidrError::Prefix(_)));
        assert!(matches!(e("10.0.0/8"), CidrError::Address(_)));
        assert!(matches!(e("example.com/8"), CidrError::Address(_)));
        assert!(matches!(e(""), CidrError::Address(_)));
        assert_eq!(
            e("10.0.0.1/8").to_string(),
            "\"10.0.0.1/8\" has host bits set; write the network address 10.0.0.0/8"
        );
        assert!(matches!(e("fd00::1/8"), CidrError::HostBits { .. }));
    }

    #[test]
    fn lenient_addresses() {
        assert_eq!(parse_address("10.0.0.1"), Some(ip("10.0.0.1")));
        assert_eq!(parse_address(" [fd00::1] "), Some(ip("fd00::1")));
        assert_eq!(parse_address("fe80::1%eth0"), Some(ip("fe80::1")));
        assert_eq!(parse_address("::ffff:10.0.0.1"), Some(ip("10.0.0.1")));
        assert_eq!(parse_address(""), None);
        assert_eq!(parse_address("/run/canopy/sock"), None);
        assert_eq!(parse_address("10.0.0.1:5000"), None);
    }
}
