//! `%`-token templates, as in flux-core's `[bootstrap]`: `%h` is the host of
//! the entry, `%p` is `bootstrap.default_port`, `%%` is a literal `%`.

/// Which tokens a key may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tokens {
    /// `%h` and `%p` (endpoints).
    HostPort,
    /// `%h` only (certificate paths).
    Host,
    /// `%h` and `%r`, the broker's rank (per-broker files: the audit log).
    HostRank,
    /// none (plain paths).
    None,
}

impl Tokens {
    fn allows(self, c: char) -> bool {
        match self {
            Tokens::HostPort => c == 'h' || c == 'p',
            Tokens::Host => c == 'h',
            Tokens::HostRank => c == 'h' || c == 'r',
            Tokens::None => false,
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Tokens::HostPort => "`%h` (host) and `%p` (default_port)",
            Tokens::Host => "`%h` (host)",
            Tokens::HostRank => "`%h` (host) and `%r` (rank)",
            Tokens::None => "no tokens",
        }
    }
}

/// The first token `template` may not use, with its byte offset.
pub(crate) fn bad_token(template: &str, allowed: Tokens) -> Option<(usize, String)> {
    let mut chars = template.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '%' {
            continue;
        }
        match chars.next() {
            Some((_, '%')) => {}
            Some((_, t)) if allowed.allows(t) => {}
            Some((_, t)) => return Some((i, format!("%{t}"))),
            None => return Some((i, "%".to_string())),
        }
    }
    None
}

/// Substitute `%h`, `%p` and `%%`. Tokens were checked at load time; any
/// other `%x` is copied as it is.
pub(crate) fn substitute(template: &str, host: &str, port: u16) -> String {
    expand(template, |t| match t {
        'h' => Some(host.to_string()),
        'p' => Some(port.to_string()),
        _ => None,
    })
}

/// Substitute `%h` (the broker's host), `%r` (its rank) and `%%` in a
/// per-broker path such as `policy.audit_log` (or `canopy start --audit`).
pub fn substitute_host_rank(template: &str, host: &str, rank: u32) -> String {
    expand(template, |t| match t {
        'h' => Some(host.to_string()),
        'r' => Some(rank.to_string()),
        _ => None,
    })
}

/// `%%` is `%`; `%x` is `value(x)`, or copied as it is when that is None.
fn expand(template: &str, value: impl Fn(char) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.peek().copied() {
            Some('%') => out.push('%'),
            Some(t) => match value(t) {
                Some(v) => out.push_str(&v),
                None => {
                    out.push('%');
                    out.push(t);
                }
            },
            None => {
                out.push('%');
                continue;
            }
        }
        chars.next();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_rank_are_substituted() {
        assert_eq!(
            substitute_host_rank("/var/log/canopy/%h-%r-100%%.log", "node3", 3),
            "/var/log/canopy/node3-3-100%.log"
        );
        assert_eq!(bad_token("/a/%h-%r.log", Tokens::HostRank), None);
        assert_eq!(
            bad_token("/a/%p.log", Tokens::HostRank).map(|t| t.1),
            Some("%p".to_string())
        );
    }

    #[test]
    fn substitutes_tokens() {
        assert_eq!(substitute("tcp://%h:%p", "node3", 8050), "tcp://node3:8050");
        assert_eq!(substitute("tcp://e%h:%p", "n1", 1), "tcp://en1:1");
        assert_eq!(substitute("/a/100%%/%h", "x", 1), "/a/100%/x");
        assert_eq!(substitute("plain", "x", 1), "plain");
    }

    #[test]
    fn finds_bad_tokens() {
        assert_eq!(bad_token("tcp://%h:%p", Tokens::HostPort), None);
        assert_eq!(
            bad_token("tcp://%h:%x", Tokens::HostPort),
            Some((9, "%x".into()))
        );
        assert_eq!(bad_token("/k/%h.key", Tokens::Host), None);
        assert_eq!(bad_token("/k/%p.key", Tokens::Host), Some((3, "%p".into())));
        assert_eq!(bad_token("/k/%", Tokens::Host), Some((3, "%".into())));
        assert_eq!(bad_token("/k/%%h", Tokens::None), None);
        assert_eq!(bad_token("/k/%h", Tokens::None), Some((3, "%h".into())));
    }
}
