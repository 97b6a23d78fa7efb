//! The evaluator: a [`Query`] against an [`Acl`], giving a [`Verdict`].
//!
//! Pure except for delegate rules, which go through a [`Delegator`]: tests
//! pass a closure, the broker uses [`crate::ProcessDelegator`].

use std::fmt;
use std::net::IpAddr;
use std::time::SystemTime;

use canopy_proto::Roles;

use crate::cidr::canonical_ip;
use crate::policy::{Acl, Action, DelegateSpec, Rule};
use crate::principal::Principal;
use crate::Mech;

/// One question: may this principal connect, and with which roles?
#[derive(Clone, Copy, Debug)]
pub struct Query<'a> {
    /// The principal as authenticated (canonicalized before matching).
    pub principal: &'a str,
    pub mechanism: Mech,
    /// The peer's address; `None` for UNIX sockets and unknown addresses.
    pub address: Option<IpAddr>,
    /// The time to judge `expires` against.
    pub now: SystemTime,
}

/// Which rule decided: `origin:line name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleRef {
    pub name: String,
    pub origin: String,
    pub line: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} {}", self.origin, self.line, self.name)
    }
}

/// The answer to a [`Query`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allow: bool,
    /// Union of the roles of every allow rule that matched; `NONE` on deny.
    pub roles: Roles,
    /// The canonical principal (the input as given if it did not parse).
    pub principal: String,
    /// For a deny, the deny rule (`None` for the default deny); for an
    /// allow, the first allow rule in file order that granted a role.
    pub rule: Option<RuleRef>,
    /// On allow, every rule that granted roles, in file order.
    pub matched: Vec<RuleRef>,
    pub reason: String,
    /// On allow, roles held only on some topics (rules with `topics`), in
    /// file order.
    pub scoped: Vec<(String, Roles)>,
    /// On allow, the namespaces it may register as services.
    pub register: Vec<String>,
}

impl Verdict {
    fn deny(principal: String, rule: Option<RuleRef>, reason: String) -> Verdict {
        Verdict {
            allow: false,
            roles: Roles::NONE,
            principal,
            rule,
            matched: Vec::new(),
            reason,
            scoped: Vec::new(),
            register: Vec::new(),
        }
    }

    /// What this verdict grants (empty on deny).
    pub fn grant(&self) -> canopy_proto::Grant {
        if !self.allow {
            return canopy_proto::Grant::default();
        }
        canopy_proto::Grant {
            roles: self.roles,
            scoped: self.scoped.clone(),
            register: self.register.clone(),
        }
    }
}

/// What a delegate program receives on stdin, as one JSON object:
/// `{"principal":"alice@R","mechanism":"gssapi","address":"10.0.0.1","rule":"ldap"}`
/// (`address` is `null` when unknown).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct DelegateRequest<'a> {
    /// Canonical principal.
    pub principal: &'a str,
    pub mechanism: Mech,
    pub address: Option<IpAddr>,
    /// Name of the delegate rule being asked about.
    pub rule: &'a str,
}

impl DelegateRequest<'_> {
    pub fn to_json(&self) -> String {
        // Serializing plain strings and an optional address cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// A delegate's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DelegateReply {
    pub allow: bool,
    /// `None`: the rule's own roles.
    pub roles: Option<Roles>,
    pub reason: Option<String>,
}

/// Answers delegate rules. `Err` is a failure (timeout, crash, bad output)
/// and, like a "no", grants nothing: delegates fail closed.
pub trait Delegator {
    fn ask(&self, spec: &DelegateSpec, req: &DelegateRequest<'_>) -> Result<DelegateReply, String>;
}

impl<F> Delegator for F
where
    F: Fn(&DelegateSpec, &DelegateRequest<'_>) -> Result<DelegateReply, String>,
{
    fn ask(&self, spec: &DelegateSpec, req: &DelegateRequest<'_>) -> Result<DelegateReply, String> {
        self(spec, req)
    }
}

/// A [`Delegator`] that runs nothing: every delegate rule grants nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDelegates;

impl Delegator for NoDelegates {
    fn ask(&self, _: &DelegateSpec, _: &DelegateRequest<'_>) -> Result<DelegateReply, String> {
        Err("delegate programs are disabled here".to_owned())
    }
}

impl Rule {
    /// Does this rule apply to the query (principal, mechanism, network,
    /// expiry)? The action is not consulted.
    pub fn applies(
        &self,
        p: &Principal,
        mech: Mech,
        addr: Option<IpAddr>,
        now: SystemTime,
    ) -> bool {
        if self.expires.is_some_and(|e| now >= e) {
            return false;
        }
        if self.mechanism.is_some_and(|m| m != mech) {
            return false;
        }
        if let Some(nets) = &self.network {
            match addr {
                Some(a) if nets.iter().any(|n| n.contains(a)) => {}
                _ => return false,
            }
        }
        if self.fold_host {
            self.pattern.matches_any_host_case(p)
        } else {
            self.pattern.matches(p)
        }
    }
}

/// Cap and escape text from outside (a delegate's reason) for a verdict.
pub(crate) fn quote(s: &str) -> String {
    let s: String = s.chars().take(200).collect();
    format!("{s:?}")
}

impl Acl {
    fn rule_ref(&self, r: &Rule) -> RuleRef {
        RuleRef {
            name: r.name.clone(),
            origin: self.origin.clone(),
            line: r.line,
        }
    }

    /// Decide, running delegate programs as real processes
    /// ([`crate::ProcessDelegator`]).
    pub fn decide(&self, q: &Query<'_>) -> Verdict {
        self.decide_with(q, &crate::ProcessDelegator)
    }

    /// Decide, asking `delegator` about delegate rules.
    ///
    /// 1. The principal is canonicalized; a malformed one, or one whose
    ///    kind cannot come with the mechanism (`curve:` only with CURVE,
    ///    `unix:` only with local, Kerberos names only with GSSAPI), is
    ///    denied.
    /// 2. A rule applies when its principal pattern, mechanism, network and
    ///    expiry all match.
    /// 3. Any applicable deny rule denies (the first in file order is
    ///    reported), and no delegate is run.
    /// 4. Otherwise the roles of the applicable allow rules are united;
    ///    then each applicable delegate rule whose roles are not already all
    ///    granted is asked, and a "yes" adds its roles.
    /// 5. No roles: default deny.
    pub fn decide_with(&self, q: &Query<'_>, delegator: &dyn Delegator) -> Verdict {
        let principal = match Principal::parse(q.principal) {
            Ok(p) => p,
            Err(e) => {
                return Verdict::deny(
                    q.principal.to_owned(),
                    None,
                    format!("malformed principal: {e}"),
                )
            }
        };
        let canonical = principal.canonical();
        if principal.kind().mechanism() != q.mechanism {
            return Verdict::deny(
                canonical,
                None,
                format!(
                    "a {} principal cannot arrive with mechanism {}; refused",
                    principal.kind().mechanism(),
                    q.mechanism
                ),
            );
        }
        let addr = q.address.map(canonical_ip);

        let mut grants: Vec<(usize, Roles)> = Vec::new();
        let mut delegates: Vec<(usize, &DelegateSpec)> = Vec::new();
        let mut scoped: Vec<(usize, &Vec<String>, Roles)> = Vec::new();
        let mut register: Vec<String> = Vec::new();
        for i in self.index.candidates(&principal) {
            let rule = &self.rules[i];
            if !rule.applies(&principal, q.mechanism, addr, q.now) {
                continue;
            }
            match &rule.action {
                Action::Deny => {
                    let r = self.rule_ref(rule);
                    let reason = format!("denied by rule {:?} ({}:{})", r.name, r.origin, r.line);
                    return Verdict::deny(canonical, Some(r), reason);
                }
                Action::Allow(roles) => match &rule.topics {
                    None => grants.push((i, *roles)),
                    Some(topics) => scoped.push((i, topics, *roles)),
                },
                Action::Delegate(spec) => delegates.push((i, spec)),
                Action::Register(list) => register.extend(list.iter().cloned()),
            }
        }

        let mut notes = Vec::new();
        let static_roles = grants.iter().fold(Roles::NONE, |a, (_, r)| a.union(*r));
        for (i, spec) in delegates {
            if static_roles.contains(spec.roles) {
                continue; // nothing to gain: do not run a process for it
            }
            let rule = &self.rules[i];
            let req = DelegateRequest {
                principal: &canonical,
                mechanism: q.mechanism,
                address: addr,
                rule: &rule.name,
            };
            let at = format!(
                "delegate rule {:?} ({}:{})",
                rule.name, self.origin, rule.line
            );
            match delegator.ask(spec, &req) {
                Ok(reply) if reply.allow => {
                    let roles = reply.roles.unwrap_or(spec.roles);
                    if roles.is_empty() {
                        notes.push(format!("{at} allowed but granted no role"));
                    } else if !spec.roles.contains(roles) {
                        notes.push(format!(
                            "{at} answered roles {roles}, beyond its limit {}; refused",
                            spec.roles
                        ));
                    } else {
                        grants.push((i, roles));
                    }
                }
                Ok(reply) => notes.push(match reply.reason {
                    Some(why) => format!("{at} said no: {}", quote(&why)),
                    None => format!("{at} said no"),
                }),
                Err(e) => notes.push(format!("{at} failed: {e}")),
            }
        }

        grants.sort_by_key(|(i, _)| *i);
        let roles = grants.iter().fold(Roles::NONE, |a, (_, r)| a.union(*r));
        if roles.is_empty() && scoped.is_empty() {
            let from = addr.map(|a| format!(" from {a}")).unwrap_or_default();
            let mut reason = format!(
                "no rule grants {canonical} ({}{from}) a role; default deny",
                q.mechanism
            );
            for n in notes {
                reason.push_str("; ");
                reason.push_str(&n);
            }
            return Verdict::deny(canonical, None, reason);
        }
        let mut granting: Vec<usize> = grants.iter().map(|(i, _)| *i).collect();
        granting.extend(scoped.iter().map(|(i, _, _)| *i));
        granting.sort_unstable();
        let matched: Vec<RuleRef> = granting
            .iter()
            .map(|i| self.rule_ref(&self.rules[*i]))
            .collect();
        let list = matched
            .iter()
            .map(|r| format!("{:?} ({}:{})", r.name, r.origin, r.line))
            .collect::<Vec<_>>()
            .join(", ");
        let s = if matched.len() == 1 { "" } else { "s" };
        let mut reason = format!("allowed by rule{s} {list}; roles {roles}");
        let scoped: Vec<(String, Roles)> = scoped
            .into_iter()
            .flat_map(|(_, topics, r)| topics.iter().map(move |t| (t.clone(), r)))
            .collect();
        for (t, r) in &scoped {
            reason.push_str(&format!(", {r} on {t}"));
        }
        register.dedup();
        if !register.is_empty() {
            reason.push_str(&format!("; may register {}", register.join(", ")));
        }
        Verdict {
            allow: true,
            roles,
            principal: canonical,
            rule: matched.first().cloned(),
            matched,
            reason,
            scoped,
            register,
        }
    }
}
