use std::fmt;

/// The roles a principal holds, as a bit set.
///
/// `peer` lets a principal join the overlay as a broker. `owner`, `admin`,
/// `operator` and `user` form a ladder for clients: each implies the ones
/// below it (see [`Roles::satisfies`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Roles(pub u32);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown role '{0}': use one of peer, owner, admin, operator, user")]
pub struct RoleParseError(pub String);

impl Roles {
    pub const NONE: Roles = Roles(0);
    pub const PEER: Roles = Roles(1);
    pub const OWNER: Roles = Roles(2);
    pub const ADMIN: Roles = Roles(4);
    pub const OPERATOR: Roles = Roles(8);
    pub const USER: Roles = Roles(16);

    const NAMES: [(Roles, &'static str); 5] = [
        (Roles::PEER, "peer"),
        (Roles::OWNER, "owner"),
        (Roles::ADMIN, "admin"),
        (Roles::OPERATOR, "operator"),
        (Roles::USER, "user"),
    ];

    pub fn union(self, other: Roles) -> Roles {
        Roles(self.0 | other.0)
    }

    pub fn contains(self, other: Roles) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Does this role set meet a requirement of `needed`, following the
    /// client ladder owner > admin > operator > user? `peer` is not on the
    /// ladder: it is satisfied only by itself.
    pub fn satisfies(self, needed: Roles) -> bool {
        let ladder = [Roles::OWNER, Roles::ADMIN, Roles::OPERATOR, Roles::USER];
        let mut effective = self;
        for (i, r) in ladder.iter().enumerate() {
            if self.contains(*r) {
                for lower in &ladder[i..] {
                    effective = effective.union(*lower);
                }
                break;
            }
        }
        effective.contains(needed)
    }

    /// Parse one role name.
    pub fn parse_one(name: &str) -> Result<Roles, RoleParseError> {
        Self::NAMES
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(name.trim()))
            .map(|(r, _)| *r)
            .ok_or_else(|| RoleParseError(name.to_string()))
    }

    /// Parse a comma-separated list such as `peer,user`. Empty means none.
    pub fn parse_list(list: &str) -> Result<Roles, RoleParseError> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .try_fold(Roles::NONE, |acc, n| Ok(acc.union(Roles::parse_one(n)?)))
    }

    /// Role names in canonical order.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(r, _)| self.contains(*r))
            .map(|(_, n)| *n)
            .collect()
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&self.names().join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder() {
        assert!(Roles::OWNER.satisfies(Roles::USER));
        assert!(Roles::OWNER.satisfies(Roles::ADMIN));
        assert!(Roles::ADMIN.satisfies(Roles::OPERATOR));
        assert!(!Roles::OPERATOR.satisfies(Roles::ADMIN));
        assert!(!Roles::USER.satisfies(Roles::OPERATOR));
        assert!(!Roles::OWNER.satisfies(Roles::PEER));
        assert!(!Roles::PEER.satisfies(Roles::USER));
        assert!(Roles::PEER.union(Roles::USER).satisfies(Roles::PEER));
        assert!(!Roles::NONE.satisfies(Roles::USER));
    }

    #[test]
    fn parse_and_display() {
        let r = Roles::parse_list("user, Peer").unwrap();
        assert_eq!(r, Roles::PEER.union(Roles::USER));
        assert_eq!(r.to_string(), "peer,user");
        assert_eq!(Roles::NONE.to_string(), "none");
        assert_eq!(
            Roles::parse_list("user,wizard").unwrap_err(),
            RoleParseError("wizard".into())
        );
    }
}
