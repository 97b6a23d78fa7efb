//! The `[budgets]` table: what clients can make a broker hold
//! (docs/security.md, "Budgets"). Every key is optional; sizes are bytes,
//! as an integer or a string with a binary unit (`"16MiB"`, `"64 KiB"`).
//! The same values come from `canopy start` / `canopy broker` flags, parsed
//! by [`parse_size`] and checked by [`BudgetSettings::check`].

/// The default largest payload on any endpoint (16 MiB).
pub const DEFAULT_MAX_MESSAGE: u64 = 16 << 20;
/// The largest `max_message` a broker accepts: the local connector's frame
/// limit (`canopy_proto::frame::MAX_PAYLOAD`, 64 MiB).
pub const MAX_MAX_MESSAGE: u64 = 64 << 20;
/// The largest byte budget accepted (1 TiB): anything larger is a typo.
pub const MAX_BYTES: u64 = 1 << 40;
/// The largest count (connections, requests in flight) accepted.
pub const MAX_COUNT: u64 = 1 << 20;

/// Every budget, with defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetSettings {
    /// Largest payload on any endpoint, in bytes (`budgets.max_message`).
    pub max_message: u64,
    /// Bytes queued or in flight for one client connection.
    pub client_bytes: u64,
    /// The same, summed over one principal's (or local uid's) connections.
    pub principal_bytes: u64,
    /// The same, summed over every client of the broker.
    pub total_bytes: u64,
    /// Connections per local uid or remote principal.
    pub connections: u64,
    /// Requests in flight per client connection.
    pub in_flight: u64,
    /// Payload bytes of requests in flight toward one neighbour broker.
    pub neighbour_bytes: u64,
}

impl Default for BudgetSettings {
    fn default() -> BudgetSettings {
        BudgetSettings {
            max_message: DEFAULT_MAX_MESSAGE,
            client_bytes: 32 << 20,
            principal_bytes: 32 << 20,
            total_bytes: 256 << 20,
            connections: 64,
            in_flight: 1024,
            neighbour_bytes: 32 << 20,
        }
    }
}

/// One budget key: its name under `[budgets]`, whether it is a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetKey {
    MaxMessage,
    ClientBytes,
    PrincipalBytes,
    TotalBytes,
    Connections,
    InFlight,
    NeighbourBytes,
}

impl BudgetKey {
    pub const ALL: [BudgetKey; 7] = [
        BudgetKey::MaxMessage,
        BudgetKey::ClientBytes,
        BudgetKey::PrincipalBytes,
        BudgetKey::TotalBytes,
        BudgetKey::Connections,
        BudgetKey::InFlight,
        BudgetKey::NeighbourBytes,
    ];

    /// The key under `[budgets]`, e.g. `max_message`.
    pub fn name(self) -> &'static str {
        match self {
            BudgetKey::MaxMessage => "max_message",
            BudgetKey::ClientBytes => "client_bytes",
            BudgetKey::PrincipalBytes => "principal_bytes",
            BudgetKey::TotalBytes => "total_bytes",
            BudgetKey::Connections => "connections",
            BudgetKey::InFlight => "in_flight",
            BudgetKey::NeighbourBytes => "neighbour_bytes",
        }
    }

    /// The command-line flag, e.g. `--max-message`.
    pub fn flag(self) -> String {
        format!("--{}", self.name().replace('_', "-"))
    }

    /// Whether the value is a size in bytes (else a count).
    pub fn is_size(self) -> bool {
        !matches!(self, BudgetKey::Connections | BudgetKey::InFlight)
    }

    fn max(self) -> u64 {
        match self {
            BudgetKey::MaxMessage => MAX_MAX_MESSAGE,
            BudgetKey::Connections | BudgetKey::InFlight => MAX_COUNT,
            _ => MAX_BYTES,
        }
    }
}

/// Why a set of budgets is refused: the key to blame and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetProblem {
    pub key: BudgetKey,
    pub message: String,
}

impl BudgetSettings {
    pub fn get(&self, k: BudgetKey) -> u64 {
        match k {
            BudgetKey::MaxMessage => self.max_message,
            BudgetKey::ClientBytes => self.client_bytes,
            BudgetKey::PrincipalBytes => self.principal_bytes,
            BudgetKey::TotalBytes => self.total_bytes,
            BudgetKey::Connections => self.connections,
            BudgetKey::InFlight => self.in_flight,
            BudgetKey::NeighbourBytes => self.neighbour_bytes,
        }
    }

    pub fn set(&mut self, k: BudgetKey, v: u64) {
        let slot = match k {
            BudgetKey::MaxMessage => &mut self.max_message,
            BudgetKey::ClientBytes => &mut self.client_bytes,
            BudgetKey::PrincipalBytes => &mut self.principal_bytes,
            BudgetKey::TotalBytes => &mut self.total_bytes,
            BudgetKey::Connections => &mut self.connections,
            BudgetKey::InFlight => &mut self.in_flight,
            BudgetKey::NeighbourBytes => &mut self.neighbour_bytes,
        };
        *slot = v;
    }

    /// Check the values: each from 1 to its maximum, and each byte budget
    /// at least the one inside it (a connection can hold one largest
    /// message; a principal at least one connection's worth; the broker at
    /// least one principal's). `set` says which keys were given, so that the
    /// key to blame is one the admin wrote.
    pub fn check(&self, set: impl Fn(BudgetKey) -> bool) -> Result<(), BudgetProblem> {
        for k in BudgetKey::ALL {
            let v = self.get(k);
            if v == 0 || v > k.max() {
                let unit = if k.is_size() { " bytes" } else { "" };
                return Err(BudgetProblem {
                    key: k,
                    message: format!(
                        "{v} is out of range; give a value from 1 to {}{unit} (default {})",
                        k.max(),
                        BudgetSettings::default().get(k)
                    ),
                });
            }
        }
        let pairs = [
            (BudgetKey::MaxMessage, BudgetKey::ClientBytes),
            (BudgetKey::ClientBytes, BudgetKey::PrincipalBytes),
            (BudgetKey::PrincipalBytes, BudgetKey::TotalBytes),
            (BudgetKey::MaxMessage, BudgetKey::NeighbourBytes),
        ];
        for (small, large) in pairs {
            let (s, l) = (self.get(small), self.get(large));
            if l < s {
                let key = if set(large) { large } else { small };
                return Err(BudgetProblem {
                    key,
                    message: format!(
                        "{} ({l} bytes) is smaller than {} ({s} bytes); raise {} or lower {}",
                        large.name(),
                        small.name(),
                        large.name(),
                        small.name()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// A size in bytes: an integer, optionally followed by a binary unit
/// (`B`, `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, case-insensitive, spaces
/// allowed before the unit). Decimal units (`MB`) are refused rather than
/// guessed.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || {
        format!("{s:?} is not a size; give bytes as an integer or with a binary unit, e.g. 1048576, \"64KiB\" or \"16MiB\"")
    };
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" | "mb" | "gb" | "tb" => {
            return Err(format!(
                "{s:?}: decimal units are ambiguous here; use a binary unit (KiB, MiB, GiB) or plain bytes"
            ))
        }
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("7B"), Ok(7));
        for bad in [
            "",
            "MiB",
            "-1",
            "1.5MiB",
            "16 furlongs",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        let e = parse_size("16MB").unwrap_err();
        assert!(e.contains("binary unit"), "{e}");
    }

    #[test]
    fn defaults_pass_and_order_is_checked() {
        BudgetSettings::default().check(|_| false).unwrap();
        let b = BudgetSettings {
            max_message: 64 << 20,
            ..Default::default()
        };
        // client_bytes was not set: blame max_message, which was.
        let e = b.check(|k| k == BudgetKey::MaxMessage).unwrap_err();
        assert_eq!(e.key, BudgetKey::MaxMessage);
        assert!(e.message.contains("client_bytes"), "{}", e.message);
        // both set: blame the larger one.
        let e = b.check(|_| true).unwrap_err();
        assert_eq!(e.key, BudgetKey::ClientBytes);
        let b = BudgetSettings {
            connections: 0,
            ..Default::default()
        };
        let e = b.check(|_| true).unwrap_err();
        assert_eq!(e.key, BudgetKey::Connections);
        assert!(e.message.contains("out of range"), "{}", e.message);
        let b = BudgetSettings {
            max_message: MAX_MAX_MESSAGE + 1,
            ..Default::default()
        };
        assert_eq!(b.check(|_| true).unwrap_err().key, BudgetKey::MaxMessage);
    }
}
