//! [`AclPolicy`]: an [`Acl`] behind the ZAP handler's [`Policy`] trait,
//! swappable at run time, optionally writing the audit log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use canopy_proto::Roles;
use canopy_zap::{AuthRequest, Decision, Mechanism, Policy};

use crate::audit::{AuditError, AuditEvent, AuditLog};
use crate::cidr::parse_address;
use crate::decide::{Delegator, Query, Verdict};
use crate::policy::Acl;
use crate::{Mech, ProcessDelegator};

/// The current policy, replaced atomically by [`AclPolicy::reload`].
///
/// Decisions clone the `Arc` under a read lock and evaluate without it, so
/// a reload never waits for a slow delegate, and a decision sees one whole
/// policy, old or new. Changes apply to the next handshake; connections
/// admitted earlier can be checked again using [`AclPolicy::generation`].
///
/// With an audit log, every decision is recorded. If the log cannot be
/// written, an admit is turned into a deny (fail closed) and the error is
/// kept for [`AclPolicy::last_audit_error`].
///
/// The ZAP domain is not consulted: the broker routes the domains it wants
/// governed by the policy to it.
pub struct AclPolicy {
    acl: RwLock<Arc<Acl>>,
    generation: AtomicU64,
    audit: Option<Mutex<AuditLog>>,
    audit_error: Mutex<Option<String>>,
    delegator: Box<dyn Delegator + Send + Sync>,
}

impl std::fmt::Debug for AclPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AclPolicy")
            .field("origin", &self.current().origin())
            .field("generation", &self.generation())
            .field("audit", &self.audit.is_some())
            .finish()
    }
}

impl AclPolicy {
    pub fn new(acl: Acl) -> AclPolicy {
        AclPolicy {
            acl: RwLock::new(Arc::new(acl)),
            generation: AtomicU64::new(0),
            audit: None,
            audit_error: Mutex::new(None),
            delegator: Box::new(ProcessDelegator),
        }
    }

    /// A policy that records every decision in `log`, starting with a
    /// `reload` entry for `acl`.
    pub fn with_audit(acl: Acl, mut log: AuditLog) -> Result<AclPolicy, AuditError> {
        log.append(&AuditEvent::reload(&acl))?;
        let mut p = AclPolicy::new(acl);
        p.audit = Some(Mutex::new(log));
        Ok(p)
    }

    /// Answer delegate rules with `delegator` instead of real processes.
    pub fn with_delegator(
        mut self,
        delegator: impl Delegator + Send + Sync + 'static,
    ) -> AclPolicy {
        self.delegator = Box::new(delegator);
        self
    }

    /// Put `new` in force for the next decision. Parse the new policy first
    /// ([`Acl::load`]): a policy that fails to parse never gets here, so the
    /// old one stays. The swap happens even if the audit entry cannot be
    /// written (see [`AclPolicy::last_audit_error`]): a reload may revoke.
    pub fn reload(&self, new: Acl) {
        let event = AuditEvent::reload(&new);
        *self.acl.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(new);
        self.generation.fetch_add(1, Ordering::SeqCst);
        let _ = self.audit(&event);
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Acl> {
        Arc::clone(&self.acl.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Increases on every reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The last audit write failure, if any since the last call.
    pub fn last_audit_error(&self) -> Option<String> {
        self.audit_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn audit(&self, event: &AuditEvent) -> Result<(), String> {
        let Some(log) = &self.audit else {
            return Ok(());
        };
        let res = log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(event)
            .map(|_| ())
            .map_err(|e| e.to_string());
        if let Err(e) = &res {
            *self
                .audit_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(e.clone());
        }
        res
    }

    /// Decide a query, and record it.
    pub fn check_query(&self, q: &Query<'_>) -> Verdict {
        let acl = self.current();
        let mut v = acl.decide_with(q, &*self.delegator);
        if let Err(e) = self.audit(&AuditEvent::decision(q, &v)) {
            if v.allow {
                v.allow = false;
                v.roles = Roles::NONE;
                v.scoped.clear();
                v.register.clear();
                v.reason = format!(
                    "{}; but the audit log cannot be written ({e}), so denied",
                    v.reason
                );
            }
        }
        v
    }

    /// Decide for a principal now, parsing `address` leniently (an empty or
    /// unparseable address is unknown, and rules with `network` then do not
    /// match). For the local connector and the remote client endpoint.
    pub fn check(&self, principal: &str, mechanism: Mech, address: &str) -> Verdict {
        self.check_query(&Query {
            principal,
            mechanism,
            address: parse_address(address),
            now: SystemTime::now(),
        })
    }

    /// Record an exec request, refusal or receipt (`canopy exec`).
    pub fn record_exec(&self, principal: &str, what: &str) -> Result<(), String> {
        self.audit(&AuditEvent::exec(principal, what))
    }

    /// Record that `principal`, holding `roles`, was refused `what` for want
    /// of a role.
    pub fn record_role_refusal(
        &self,
        principal: &str,
        mechanism: Option<Mech>,
        address: Option<&str>,
        roles: Roles,
        what: &str,
    ) -> Result<(), String> {
        self.audit(&AuditEvent::role_refusal(
            principal,
            mechanism.map(Mech::as_str),
            address,
            roles,
            what,
        ))
    }
}

impl Policy for AclPolicy {
    fn decide(&self, req: &AuthRequest<'_>) -> Decision {
        let mech = match req.mechanism {
            Mechanism::Curve => Mech::Curve,
            Mechanism::Gssapi => Mech::Gssapi,
            other => {
                let reason = format!("mechanism {other} is not accepted; use curve or gssapi");
                let _ = self.audit(&AuditEvent {
                    kind: crate::audit::AuditKind::Deny,
                    principal: Some(req.principal.to_owned()),
                    address: parse_address(req.address).map(|a| a.to_string()),
                    mechanism: Some(other.as_str().to_ascii_lowercase()),
                    roles: Roles::NONE,
                    rule: None,
                    reason: reason.clone(),
                });
                return Decision::Deny { reason };
            }
        };
        let v = self.check(req.principal, mech, req.address);
        if v.allow {
            Decision::allow(v.principal.clone(), v.grant(), v.reason)
        } else {
            Decision::Deny { reason: v.reason }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoDelegates;

    #[test]
    fn an_admit_that_cannot_be_audited_is_a_deny() {
        if !std::path::Path::new("/dev/full").exists() {
            return;
        }
        let acl = Acl::parse(
            "[[rule]]\nname = \"all\"\nprincipal = \"unix:*\"\nroles = [\"user\"]\n",
            "p.toml",
        )
        .unwrap();
        let mut p = AclPolicy::new(acl.clone()).with_delegator(NoDelegates);
        p.audit = Some(Mutex::new(AuditLog::open("/dev/full").unwrap()));
        let v = p.check("unix:alice", Mech::Local, "");
        assert!(!v.allow);
        assert_eq!(v.roles, Roles::NONE);
        assert!(
            v.reason.contains("audit log cannot be written"),
            "{}",
            v.reason
        );
        assert!(p.last_audit_error().unwrap().contains("check free space"));
        assert_eq!(p.last_audit_error(), None, "taken");
        // A reload still takes effect, and the failure is kept.
        p.reload(acl);
        assert_eq!(p.generation(), 1);
        assert!(p.last_audit_error().is_some());
        // Without an audit log the same principal is admitted.
        p.audit = None;
        assert!(p.check("unix:alice", Mech::Local, "").allow);
    }
}
