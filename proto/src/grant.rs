//! What a policy grants one principal: roles everywhere, roles scoped to
//! topic patterns, and the service namespaces it may register.
//!
//! Pure data, shared by the policy (`canopy-acl`, which builds it), the
//! broker core (which stamps a caller's roles *for each request's topic*)
//! and the ZAP handler (which carries it to the broker as metadata).

use crate::Roles;

/// Does `topic` match `pattern`? A pattern is an exact topic, `*` for
/// everything, or a prefix ending in `*` (`backup.*`).
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

/// Is `pattern` a well-formed topic pattern: 1 to 255 bytes of
/// `A-Z a-z 0-9 _ . -`, optionally ending in one `*`?
pub fn valid_topic_pattern(pattern: &str) -> bool {
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    !pattern.is_empty()
        && pattern.len() <= crate::MAX_TOPIC
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A principal's grant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// Roles on every topic.
    pub roles: Roles,
    /// Roles on the topics that match a pattern only, in policy order.
    pub scoped: Vec<(String, Roles)>,
    /// Namespace patterns (`kvs`, `backup*`) it may register as a service.
    pub register: Vec<String>,
}

/// Why a grant's metadata encoding did not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed scope metadata {0:?}; the ZAP handler and the broker disagree, upgrade both")]
pub struct GrantDecodeError(pub String);

impl Grant {
    /// Roles everywhere, nothing scoped.
    pub fn plain(roles: Roles) -> Grant {
        Grant {
            roles,
            ..Grant::default()
        }
    }

    /// Nothing at all: not admitted.
    pub fn is_empty(&self) -> bool {
        self.roles.is_empty() && self.scoped.iter().all(|(_, r)| r.is_empty())
    }

    /// The roles this grant gives on `topic`.
    pub fn roles_for(&self, topic: &str) -> Roles {
        self.scoped
            .iter()
            .filter(|(p, _)| topic_matches(p, topic))
            .fold(self.roles, |a, (_, r)| a.union(*r))
    }

    /// Every role on some topic (for logs and `whoami`).
    pub fn all_roles(&self) -> Roles {
        self.scoped.iter().fold(self.roles, |a, (_, r)| a.union(*r))
    }

    /// May this grant register namespace `ns`?
    pub fn may_register(&self, ns: &str) -> bool {
        self.register.iter().any(|p| topic_matches(p, ns))
    }

    /// Nothing beyond plain roles.
    pub fn is_plain(&self) -> bool {
        self.scoped.is_empty() && self.register.is_empty()
    }

    /// The scoped roles and register patterns as one metadata string:
    /// `operator,user@backup.* operator@job.cancel;kvs backup*`.
    /// Patterns and role names hold no spaces, `@` or `;`.
    pub fn encode_scope(&self) -> String {
        let scoped: Vec<String> = self
            .scoped
            .iter()
            .map(|(p, r)| format!("{}@{p}", r.names().join(",")))
            .collect();
        format!("{};{}", scoped.join(" "), self.register.join(" "))
    }

    /// The inverse of [`Grant::encode_scope`], onto `roles`.
    pub fn decode_scope(roles: Roles, s: &str) -> Result<Grant, GrantDecodeError> {
        let bad = || GrantDecodeError(s.chars().take(80).collect());
        let (scoped, register) = s.split_once(';').ok_or_else(bad)?;
        let mut g = Grant::plain(roles);
        for item in scoped.split(' ').filter(|x| !x.is_empty()) {
            let (r, p) = item.split_once('@').ok_or_else(bad)?;
            let r = Roles::parse_list(r).map_err(|_| bad())?;
            if !valid_topic_pattern(p) {
                return Err(bad());
            }
            g.scoped.push((p.to_string(), r));
        }
        for p in register.split(' ').filter(|x| !x.is_empty()) {
            if !valid_topic_pattern(p) {
                return Err(bad());
            }
            g.register.push(p.to_string());
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_roles_apply_to_their_topics_only() {
        let g = Grant {
            roles: Roles::USER,
            scoped: vec![("backup.*".into(), Roles::OPERATOR)],
            register: vec!["backup".into()],
        };
        assert!(g.roles_for("backup.start").satisfies(Roles::OPERATOR));
        assert!(!g.roles_for("job.cancel").satisfies(Roles::OPERATOR));
        assert!(g.roles_for("job.cancel").satisfies(Roles::USER));
        assert!(!g.roles_for("backup").satisfies(Roles::OPERATOR));
        assert!(g.may_register("backup") && !g.may_register("backupx") && !g.may_register("job"));
        assert!(!g.is_empty() && !g.is_plain());
    }

    #[test]
    fn scope_metadata_round_trips_and_refuses_junk() {
        let g = Grant {
            roles: Roles::USER,
            scoped: vec![
                ("backup.*".into(), Roles::OPERATOR.union(Roles::USER)),
                ("job.cancel".into(), Roles::ADMIN),
            ],
            register: vec!["kvs".into(), "backup*".into()],
        };
        let s = g.encode_scope();
        assert_eq!(Grant::decode_scope(Roles::USER, &s).unwrap(), g);
        assert_eq!(
            Grant::decode_scope(Roles::OWNER, ";").unwrap(),
            Grant::plain(Roles::OWNER)
        );
        for junk in ["", "x", "wizard@a;", "user@a b;", "user@;", "user@a;b c@"] {
            assert!(Grant::decode_scope(Roles::USER, junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn patterns() {
        for ok in ["*", "backup.*", "job.cancel", "a*", "x-y_z.1"] {
            assert!(valid_topic_pattern(ok), "{ok}");
        }
        for bad in ["", "a b", "a**", "*a", "a@b", "a;b", "é"] {
            assert!(!valid_topic_pattern(bad), "{bad}");
        }
        assert!(!valid_topic_pattern(&"a".repeat(256)));
    }
}
