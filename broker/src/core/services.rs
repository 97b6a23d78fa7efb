//! The one service table: every topic a broker serves, with the role a
//! caller needs, and the built-in handlers. A handler answers, or asks the
//! shell for an effect (reload the policy, load a key, run a job) whose
//! result comes back as an input and is answered then.

use super::{BrokerCore, Event, Job};
use canopy_modules::{Ctx, Reply};
use canopy_proto::{errno, Header, Roles};

/// What serves a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// A `canopy_modules` module (`broker.ping`, `overlay.status`).
    Module,
    EventPub,
    Subscription,
    Disconnect,
    AclReload,
    AclCheck,
    KeySwitch,
    KeyReload,
    KeyStatus,
    Whoami,
    ServiceAdd,
    ServiceRemove,
    ServiceList,
    /// `exec.run` (exec.rs; a personal instance also needs `owner`).
    ExecRun,
    /// `exec.kill`, `exec.write`: only for the caller's own `exec.run`.
    ExecControl,
    /// A namespace a client offers (`service.add`): not in [`SERVICES`],
    /// found in the core's registry.
    Provided,
}

/// One row of the table.
pub struct Service {
    pub topic: &'static str,
    /// The least role a caller needs.
    pub role: Roles,
    /// Served only on rank 0 (elsewhere the request is routed up).
    pub rank0_only: bool,
    pub builtin: Builtin,
}

const fn row(topic: &'static str, role: Roles, rank0_only: bool, builtin: Builtin) -> Service {
    Service {
        topic,
        role,
        rank0_only,
        builtin,
    }
}

/// Every topic the broker serves and the role it needs.
pub const SERVICES: &[Service] = &[
    row("broker.ping", Roles::USER, false, Builtin::Module),
    row("overlay.status", Roles::USER, false, Builtin::Module),
    row("broker.whoami", Roles::USER, false, Builtin::Whoami),
    row("event.pub", Roles::OPERATOR, true, Builtin::EventPub),
    row("event.subscribe", Roles::USER, false, Builtin::Subscription),
    row(
        "event.unsubscribe",
        Roles::USER,
        false,
        Builtin::Subscription,
    ),
    row(
        super::DISCONNECT_TOPIC,
        Roles::ADMIN,
        false,
        Builtin::Disconnect,
    ),
    row("acl.reload", Roles::ADMIN, false, Builtin::AclReload),
    row("acl.check", Roles::ADMIN, false, Builtin::AclCheck),
    row(
        super::keys::SWITCH_TOPIC,
        Roles::ADMIN,
        false,
        Builtin::KeySwitch,
    ),
    row(
        super::keys::RELOAD_TOPIC,
        Roles::ADMIN,
        false,
        Builtin::KeyReload,
    ),
    row(
        super::keys::STATUS_TOPIC,
        Roles::USER,
        false,
        Builtin::KeyStatus,
    ),
    // Who may register is decided by the policy's `register` grants (or
    // ownership), in `provided.rs`; the role here only admits the request.
    row("service.add", Roles::USER, false, Builtin::ServiceAdd),
    row("service.remove", Roles::USER, false, Builtin::ServiceRemove),
    row("service.list", Roles::USER, false, Builtin::ServiceList),
    // In a personal instance exec.rs also requires `owner` (commands run
    // as the owner); in a system instance the helper checks the user's
    // signed request, so any admitted user may submit one.
    row(super::exec::RUN_TOPIC, Roles::USER, false, Builtin::ExecRun),
    row(
        super::exec::KILL_TOPIC,
        Roles::USER,
        false,
        Builtin::ExecControl,
    ),
    row(
        super::exec::WRITE_TOPIC,
        Roles::USER,
        false,
        Builtin::ExecControl,
    ),
];

/// The role and handler for `topic` on `rank`, if this broker serves it.
pub fn lookup(
    topic: &str,
    rank: u32,
    modules: &canopy_modules::Registry,
) -> Option<(Roles, Builtin)> {
    let s = SERVICES.iter().find(|s| s.topic == topic)?;
    if s.rank0_only && rank != 0 {
        return None;
    }
    if s.builtin == Builtin::Module && !modules.offers(topic) {
        return None;
    }
    Some((s.role, s.builtin))
}

/// `event.pub`'s payload: a u16 topic length, the topic, the data.
pub fn parse_event_pub(body: &[u8]) -> Result<(String, &[u8]), (u32, &'static str)> {
    if body.len() < 2 {
        return Err((
            errno::EPROTO,
            "event.pub payload must start with a u16 topic length",
        ));
    }
    let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
    let Some(topic) = body
        .get(2..2 + tlen)
        .and_then(|t| std::str::from_utf8(t).ok())
    else {
        return Err((errno::EPROTO, "event.pub topic is truncated or not UTF-8"));
    };
    if topic.is_empty() || topic.len() > canopy_proto::MAX_TOPIC {
        return Err((errno::EINVAL, "event topic must be 1 to 255 bytes"));
    }
    Ok((topic.to_string(), &body[2 + tlen..]))
}

impl<P: AsRef<[u8]> + From<Vec<u8>>> BrokerCore<P> {
    /// Serve a request whose role was checked.
    pub(super) fn call(&mut self, svc: Builtin, h: Header, payload: P) {
        match svc {
            Builtin::EventPub => self.publish(h, payload),
            Builtin::Subscription => self.subscription(h, payload),
            Builtin::Disconnect => self.disconnect_rpc(h, payload),
            Builtin::AclReload => self
                .events
                .push_back(Event::Job(Job::ReloadPolicy { req: Some(h) })),
            Builtin::AclCheck => self.events.push_back(Event::Job(Job::Explain {
                req: h,
                query: payload.as_ref().to_vec(),
            })),
            Builtin::KeySwitch => self.key_switch(h),
            Builtin::KeyReload => {
                if self.rot.has_files {
                    self.events.push_back(Event::ReloadKeys { req: Some(h) });
                } else {
                    self.respond_err(&h, errno::EINVAL, "this broker has no certificate files to reload: keys rotate only in system instances (canopy broker --config)");
                }
            }
            Builtin::KeyStatus => self.key_status(h),
            Builtin::Whoami => self.whoami(h),
            Builtin::ServiceAdd => self.service_add(h, payload),
            Builtin::ServiceRemove => self.service_remove(h, payload),
            Builtin::ServiceList => self.service_list(h),
            Builtin::Provided => self.deliver_to_provider(h, payload),
            Builtin::ExecRun => self.exec_run(h, payload),
            Builtin::ExecControl => self.exec_control_rpc(h, payload),
            Builtin::Module => {
                let ctx = Ctx {
                    rank: self.rank,
                    topo: &self.topo,
                    health: &self.health,
                    now_ms: self.now,
                    info: &self.info,
                };
                match self.modules.handle(&ctx, &h, payload.as_ref()) {
                    Some(Reply::Ok(body)) => self.respond(&h, P::from(body)),
                    Some(Reply::Echo) => self.respond(&h, payload),
                    Some(Reply::Err(e, msg)) => self.respond_err(&h, e, &msg),
                    None => self.respond_err(&h, errno::ENOSYS, "no such method"),
                }
            }
        }
    }
}

impl<P: AsRef<[u8]> + From<Vec<u8>>> BrokerCore<P> {
    /// `broker.whoami`: answered by the caller's own broker, which knows
    /// how it authenticated the connection.
    fn whoami(&mut self, h: Header) {
        let client = match h.route.as_slice() {
            [canopy_proto::Hop::Local(id)] => self.clients.get(id),
            _ => None,
        };
        let Some(c) = client else {
            return self.respond_err(
                &h,
                errno::EINVAL,
                "broker.whoami is answered by the broker you are connected to: send it to rank ANY or to that broker's rank",
            );
        };
        let job = Job::Whoami {
            principal: c.principal.clone(),
            mech: c.mech,
            address: c.address.clone(),
            grant: c.grant.clone(),
            req: h,
        };
        self.events.push_back(Event::Job(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_topic_once_and_modules_covered() {
        let mut seen = std::collections::HashSet::new();
        for s in SERVICES {
            assert!(seen.insert(s.topic), "{} twice", s.topic);
        }
        let m = canopy_modules::Registry::standard();
        for t in ["broker.ping", "overlay.status"] {
            assert!(m.offers(t));
            assert_eq!(lookup(t, 3, &m).map(|x| x.1), Some(Builtin::Module));
        }
        assert_eq!(lookup("event.pub", 1, &m), None);
        assert_eq!(
            lookup("event.pub", 0, &m),
            Some((Roles::OPERATOR, Builtin::EventPub))
        );
        assert_eq!(lookup("acl.reload", 5, &m).map(|x| x.0), Some(Roles::ADMIN));
        assert_eq!(lookup("nope", 0, &m), None);
    }

    #[test]
    fn event_pub_payload() {
        let mut b = vec![0, 3];
        b.extend_from_slice(b"a.bdata");
        assert_eq!(
            parse_event_pub(&b).unwrap(),
            ("a.b".to_string(), &b"data"[..])
        );
        assert_eq!(parse_event_pub(&[0]).unwrap_err().0, errno::EPROTO);
        assert_eq!(parse_event_pub(&[0, 9, b'a']).unwrap_err().0, errno::EPROTO);
        assert_eq!(parse_event_pub(&[0, 0]).unwrap_err().0, errno::EINVAL);
    }
}
