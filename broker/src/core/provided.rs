//! Services offered by clients (`service.add`): the registrations, the
//! delivery of requests to their provider, the provider's responses, and
//! the end of a registration. The wire contract is docs/protocol.md §6.1.
//!
//! A registration belongs to one client connection. Requests delivered to
//! it are remembered by a token (the matchtag the provider sees) with the
//! caller's header, so that a response is routed back along the caller's
//! path, and so that a provider can answer only what it was given. When
//! the registration ends, every remembered request is answered ENOSYS.

use super::{BrokerCore, Hop, REFUSED_NOT_REQUEST};
use canopy_proto::{errno, Header, MsgType, Roles};
use std::collections::BTreeMap;
use tracing::{debug, info, warn};

/// Namespaces no client may register: the broker's own, and those other
/// parts of Canopy reserve.
pub const RESERVED: &[&str] = &[
    "broker", "overlay", "event", "acl", "key", "service", "instance", "access", "connect", "exec",
    "cert", "receipt",
];
/// Most namespaces one connection may offer.
pub const MAX_OFFERS: usize = 16;
/// Most methods in one registration.
pub const MAX_METHODS: usize = 256;
/// Topic of the response that tells a provider it answered something it
/// was not given.
pub const SERVICE_ERROR_TOPIC: &str = "service.error";
/// Topic of the control message that probes a remote provider holding
/// requests (clients ignore control messages).
pub const PROBE_TOPIC: &str = "service.probe";
/// How often remote providers holding requests are probed.
pub const PROVIDER_PROBE_MS: u64 = 500;

/// One namespace offered on this broker.
pub(super) struct Registration {
    pub provider: u32,
    pub principal: String,
    pub methods: BTreeMap<String, Roles>,
}

/// The namespace of a topic: what comes before the first dot.
pub fn namespace(topic: &str) -> &str {
    topic.split_once('.').map_or(topic, |(ns, _)| ns)
}

fn valid_namespace(ns: &str) -> bool {
    (1..=64).contains(&ns.len())
        && ns.as_bytes()[0].is_ascii_lowercase()
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn valid_method(m: &str) -> bool {
    (1..=128).contains(&m.len())
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AddRequest {
    namespace: String,
    methods: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveRequest {
    namespace: String,
}

/// A validated `service.add` body: the namespace and each method's role.
pub fn parse_add(body: &[u8]) -> Result<(String, BTreeMap<String, Roles>), (u32, String)> {
    let req: AddRequest = serde_json::from_slice(body).map_err(|e| {
        (
            errno::EPROTO,
            format!("service.add wants {{\"namespace\":NS,\"methods\":{{METHOD:ROLE,...}}}}: {e}"),
        )
    })?;
    let ns = req.namespace;
    if !valid_namespace(&ns) {
        let shown: String = ns.chars().take(70).collect();
        return Err((
            errno::EINVAL,
            format!("bad namespace {shown:?}: use 1 to 64 of a-z, 0-9, '_' or '-', starting with a letter"),
        ));
    }
    if RESERVED.contains(&ns.as_str()) {
        return Err((
            errno::EPERM,
            format!("namespace {ns:?} is reserved for canopy itself; choose another name"),
        ));
    }
    if req.methods.is_empty() || req.methods.len() > MAX_METHODS {
        return Err((
            errno::EINVAL,
            format!(
                "a service declares 1 to {MAX_METHODS} methods; this one declares {}",
                req.methods.len()
            ),
        ));
    }
    let mut methods = BTreeMap::new();
    for (m, role) in req.methods {
        if !valid_method(&m) || ns.len() + 1 + m.len() > canopy_proto::MAX_TOPIC {
            let shown: String = m.chars().take(70).collect();
            return Err((
                errno::EINVAL,
                format!("bad method name {shown:?}: use 1 to 128 of A-Z, a-z, 0-9, '_', '.' or '-' (and keep NS.METHOD within 255 bytes)"),
            ));
        }
        let r = match Roles::parse_one(&role) {
            Ok(r) if r != Roles::PEER => r,
            _ => {
                let shown: String = role.chars().take(40).collect();
                return Err((
                    errno::EINVAL,
                    format!("method {m:?} needs unknown role {shown:?}: use one of owner, admin, operator, user"),
                ));
            }
        };
        methods.insert(m, r);
    }
    Ok((ns, methods))
}

/// A `service.remove` body's namespace.
pub fn parse_remove(body: &[u8]) -> Result<String, (u32, String)> {
    serde_json::from_slice::<RemoveRequest>(body)
        .map(|r| r.namespace)
        .map_err(|e| {
            (
                errno::EPROTO,
                format!("service.remove wants {{\"namespace\":NS}}: {e}"),
            )
        })
}

impl<P: AsRef<[u8]> + From<Vec<u8>>> BrokerCore<P> {
    /// The least role `topic` needs here if a client offers its namespace
    /// on this broker; `Roles::NONE` for a method it did not declare (the
    /// request then gets ENOSYS from [`BrokerCore::deliver_to_provider`]).
    pub(super) fn provided_role(&self, topic: &str) -> Option<Roles> {
        if self.registry.is_empty() {
            return None;
        }
        let (ns, method) = topic.split_once('.')?;
        let reg = self.registry.get(ns)?;
        Some(reg.methods.get(method).copied().unwrap_or(Roles::NONE))
    }

    /// The id of the local or remote client that sent `h` to this very
    /// broker, if it did (`service.add` must be sent there).
    fn sender_here(&self, h: &Header) -> Option<u32> {
        match h.route.as_slice() {
            [Hop::Local(id)] if self.clients.contains_key(id) => Some(*id),
            _ => None,
        }
    }

    pub(super) fn service_add(&mut self, h: Header, payload: P) {
        let Some(id) = self.sender_here(&h) else {
            return self.respond_err(&h, errno::EINVAL, "service.add registers on the broker you are connected to: send it to rank ANY or to that broker's rank");
        };
        let (ns, methods) = match parse_add(payload.as_ref()) {
            Ok(x) => x,
            Err((e, msg)) => {
                if e == errno::EPERM {
                    warn!(verdict = %"deny", principal = %h.userid, reason = %msg, "services: registration refused");
                }
                return self.respond_err(&h, e, &msg);
            }
        };
        let c = &self.clients[&id];
        let owner = c.grant.roles.satisfies(Roles::OWNER);
        if !owner && !c.grant.may_register(&ns) {
            warn!(verdict = %"deny", principal = %c.principal, namespace = %ns, reason = %"no register grant", "services: registration refused");
            let msg = format!("permission denied: {} may not register namespace {ns:?}; only the instance owner may, or a principal the policy grants `register = [\"{ns}\"]`", c.principal);
            return self.respond_err(&h, errno::EPERM, &msg);
        }
        if let Some(r) = self.registry.get(&ns) {
            let msg = format!(
                "namespace {ns:?} is already offered on rank {} by {}; remove that registration first, or choose another name",
                self.rank, r.principal
            );
            return self.respond_err(&h, errno::EEXIST, &msg);
        }
        if c.offers.len() >= MAX_OFFERS {
            let msg = format!("this connection already offers {MAX_OFFERS} namespaces; remove one first, or open another connection");
            return self.respond_err(&h, errno::EAGAIN, &msg);
        }
        let principal = c.principal.clone();
        info!(verdict = %"allow", principal = %principal, namespace = %ns, methods = methods.len(), "services: namespace registered");
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        c.offers.push(ns.clone());
        self.registry.insert(
            ns.clone(),
            Registration {
                provider: id,
                principal,
                methods,
            },
        );
        let body = serde_json::json!({"namespace": ns, "rank": self.rank});
        self.respond(&h, P::from(body.to_string().into_bytes()));
    }

    pub(super) fn service_remove(&mut self, h: Header, payload: P) {
        let Some(id) = self.sender_here(&h) else {
            return self.respond_err(&h, errno::EINVAL, "service.remove is answered by the broker you are connected to: send it to rank ANY or to that broker's rank");
        };
        let ns = match parse_remove(payload.as_ref()) {
            Ok(ns) => ns,
            Err((e, msg)) => return self.respond_err(&h, e, &msg),
        };
        if self.registry.get(&ns).map(|r| r.provider) != Some(id) {
            let shown: String = ns.chars().take(70).collect();
            let msg = format!(
                "this connection does not offer namespace {shown:?}; see 'canopy service list'"
            );
            return self.respond_err(&h, errno::ENOENT, &msg);
        }
        let failed = self.end_registration(&ns, "its provider removed it");
        let body = serde_json::json!({"namespace": ns, "failed": failed});
        self.respond(&h, P::from(body.to_string().into_bytes()));
    }

    /// `service.list`: every namespace this broker serves, built-in or
    /// offered, with its methods' roles and who provides it.
    pub(super) fn service_list(&mut self, h: Header) {
        let mut builtin: BTreeMap<&str, serde_json::Map<String, serde_json::Value>> =
            BTreeMap::new();
        for s in super::SERVICES {
            if super::services::lookup(s.topic, self.rank, &self.modules).is_none() {
                continue;
            }
            let (ns, m) = s.topic.split_once('.').unwrap_or((s.topic, ""));
            builtin
                .entry(ns)
                .or_default()
                .insert(m.to_string(), s.role.to_string().into());
        }
        let mut list: Vec<serde_json::Value> = builtin
            .into_iter()
            .map(|(ns, methods)| {
                serde_json::json!({"namespace": ns, "provider": "broker", "methods": methods, "outstanding": 0})
            })
            .collect();
        let mut offered: Vec<(&String, &Registration)> = self.registry.iter().collect();
        offered.sort_by(|a, b| a.0.cmp(b.0));
        for (ns, r) in offered {
            let methods: serde_json::Map<String, serde_json::Value> = r
                .methods
                .iter()
                .map(|(m, role)| (m.clone(), role.to_string().into()))
                .collect();
            let outstanding = self.clients.get(&r.provider).map_or(0, |c| {
                c.delivered
                    .values()
                    .filter(|d| namespace(&d.topic) == ns.as_str())
                    .count()
            });
            list.push(serde_json::json!({"namespace": ns, "provider": r.principal, "methods": methods, "outstanding": outstanding}));
        }
        let body = serde_json::json!({"rank": self.rank, "services": list});
        self.respond(&h, P::from(body.to_string().into_bytes()));
    }

    /// Hand a request for an offered namespace to its provider.
    pub(super) fn deliver_to_provider(&mut self, h: Header, payload: P) {
        let ns = namespace(&h.topic);
        let Some(reg) = self.registry.get(ns) else {
            let msg = format!("no service offers '{}'", h.topic);
            return self.respond_err(&h, errno::ENOSYS, &msg);
        };
        let method = &h.topic[ns.len() + 1..];
        if !reg.methods.contains_key(method) {
            let offered: Vec<&str> = reg.methods.keys().map(String::as_str).collect();
            let msg = format!(
                "service {ns} on rank {} has no method '{method}'; it offers {}",
                self.rank,
                offered.join(", ")
            );
            return self.respond_err(&h, errno::ENOSYS, &msg);
        }
        let provider = reg.provider;
        let budget = self.budgets.in_flight;
        let rank = self.rank;
        let Some(c) = self.clients.get_mut(&provider) else {
            let msg = format!("no service offers '{}'", h.topic);
            return self.respond_err(&h, errno::ENOSYS, &msg);
        };
        if !super::no_response(&h) && c.delivered.len() >= budget {
            let msg = format!("service {ns} on rank {rank} already holds {budget} unanswered requests (budget); retry later");
            return self.respond_err(&h, errno::EAGAIN, &msg);
        }
        // Every delivery gets a token, also one that wants no response (so
        // that a provider answering it anyway hears of it with a non-zero
        // matchtag); only those that want one are remembered.
        let mut token = c.next_token;
        loop {
            token = token.wrapping_add(1).max(1);
            if !c.delivered.contains_key(&token) {
                break;
            }
        }
        c.next_token = token;
        let mut d = h.clone();
        d.nodeid = rank;
        // Only this broker says whether it authenticated the caller itself
        // (a CA trusts no stamp made by another broker): the caller's own
        // bits other than NORESPONSE are not passed on.
        let direct = matches!(h.route.as_slice(), [Hop::Local(_)]);
        d.flags = (h.flags & canopy_proto::FLAG_NORESPONSE)
            | if direct { canopy_proto::FLAG_DIRECT } else { 0 };
        d.route.clear();
        d.matchtag = token;
        if !super::no_response(&h) {
            c.delivered.insert(token, h);
            if c.kind == super::ClientKind::Remote && self.provider_probe_at.is_none() {
                self.provider_probe_at = Some(self.now + PROVIDER_PROBE_MS);
            }
        }
        self.deliver(provider, d, payload, false);
    }

    /// A response from a provider: routed back along its caller's path, if
    /// it answers a request delivered to this connection.
    pub(super) fn provider_answered(&mut self, id: u32, h: Header, payload: P) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        match c.delivered.remove(&h.matchtag) {
            Some(req) => {
                let r = req.response(self.rank, h.errnum);
                self.route_response(r, payload);
            }
            None if h.matchtag == 0 => {
                // No token is 0; a note with matchtag 0 would read as a
                // refusal of the connection (§2.2). Dropped.
                debug!(principal = %c.principal, "services: a response with matchtag 0 dropped");
            }
            None => {
                let first = c.warned & REFUSED_NOT_REQUEST == 0;
                c.warned |= REFUSED_NOT_REQUEST;
                if first {
                    warn!(verdict = %"deny", principal = %c.principal, matchtag = h.matchtag, "services: a response to no request delivered to this connection; dropped (logged once per connection)");
                } else {
                    debug!(principal = %c.principal, matchtag = h.matchtag, "services: stray response dropped");
                }
                let mut e = Header::request(SERVICE_ERROR_TOPIC, self.rank, h.matchtag);
                e.msg_type = MsgType::Response;
                e.errnum = errno::ENOENT;
                let msg = format!("no request with matchtag {} was delivered to this connection, or it was already answered, or it asked for no response; nothing was sent", h.matchtag);
                // Not through `deliver`: this matchtag is the broker's
                // token, not one of the client's own requests in flight.
                let t = match c.kind {
                    super::ClientKind::Local { .. } => {
                        super::Transmit::Local(id, e, P::from(msg.into_bytes()))
                    }
                    super::ClientKind::Remote => {
                        super::Transmit::Remote(c.rid.clone(), e, P::from(msg.into_bytes()))
                    }
                };
                self.transmits.push_back(t);
            }
        }
    }

    /// End namespace `ns`: its provider gets no more requests, and every
    /// request still waiting for it is answered ENOSYS now. Returns how
    /// many were.
    pub(super) fn end_registration(&mut self, ns: &str, why: &str) -> usize {
        let Some(reg) = self.registry.remove(ns) else {
            return 0;
        };
        info!(principal = %reg.principal, namespace = %ns, reason = %why, "services: namespace ended");
        let Some(c) = self.clients.get_mut(&reg.provider) else {
            return 0;
        };
        c.offers.retain(|o| o != ns);
        let tokens: Vec<u32> = c
            .delivered
            .iter()
            .filter(|(_, d)| namespace(&d.topic) == ns)
            .map(|(t, _)| *t)
            .collect();
        let waiting: Vec<Header> = tokens
            .iter()
            .filter_map(|t| c.delivered.remove(t))
            .collect();
        self.fail_waiting(ns, why, waiting)
    }

    /// Answer requests that were waiting for a provider that went away.
    pub(super) fn fail_waiting(&mut self, ns: &str, why: &str, waiting: Vec<Header>) -> usize {
        let n = waiting.len();
        let msg = format!(
            "service {ns} on rank {} went away ({why}); retry when it is offered again",
            self.rank
        );
        for req in waiting {
            self.respond_err(&req, errno::ENOSYS, &msg);
        }
        n
    }

    /// Probe each remote provider that holds requests: libzmq tells which
    /// remote connection closed only by failing a send to it, which then
    /// ends its registrations (every waiting caller gets ENOSYS). Again
    /// every [`PROVIDER_PROBE_MS`] while any holds requests.
    pub(super) fn probe_providers(&mut self) {
        let rids: Vec<Vec<u8>> = self
            .clients
            .values()
            .filter(|c| c.kind == super::ClientKind::Remote && !c.delivered.is_empty())
            .map(|c| c.rid.clone())
            .collect();
        self.provider_probe_at = (!rids.is_empty()).then_some(self.now + PROVIDER_PROBE_MS);
        for rid in rids {
            self.transmits.push_back(super::Transmit::Remote(
                rid,
                Header::control(PROBE_TOPIC),
                P::from(Vec::new()),
            ));
        }
    }

    /// A client is gone: end everything it offered.
    pub(super) fn provider_gone(&mut self, offers: Vec<String>, delivered: Vec<Header>) {
        for ns in &offers {
            if let Some(r) = self.registry.remove(ns) {
                info!(principal = %r.principal, namespace = %ns, "services: namespace ended: its provider disconnected");
            }
        }
        for ns in &offers {
            let mine: Vec<Header> = delivered
                .iter()
                .filter(|d| namespace(&d.topic) == ns.as_str())
                .cloned()
                .collect();
            self.fail_waiting(ns, "its provider disconnected", mine);
        }
    }

    /// After a policy reload: end the registrations a client may no longer
    /// make.
    pub(super) fn recheck_offers(&mut self, id: u32) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        let owner = c.grant.roles.satisfies(Roles::OWNER);
        let lost: Vec<String> = c
            .offers
            .iter()
            .filter(|ns| !owner && !c.grant.may_register(ns))
            .cloned()
            .collect();
        for ns in lost {
            self.end_registration(&ns, "the policy no longer lets its provider register it");
        }
    }

    /// `event.pub` from a provider, of a topic in a namespace it offers:
    /// allowed whatever its roles (docs/protocol.md §6.1).
    pub(super) fn publishes_own_namespace(offers: &[String], payload: &[u8]) -> bool {
        match super::services::parse_event_pub(payload) {
            Ok((topic, _)) => offers.iter().any(|ns| {
                topic.len() > ns.len() + 1
                    && topic.starts_with(ns.as_str())
                    && topic.as_bytes()[ns.len()] == b'.'
            }),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_are_validated() {
        let (ns, m) =
            parse_add(br#"{"namespace":"kvs","methods":{"get":"user","put":"operator"}}"#).unwrap();
        assert_eq!(ns, "kvs");
        assert_eq!(m["get"], Roles::USER);
        assert_eq!(m["put"], Roles::OPERATOR);
        let err = |b: &[u8]| parse_add(b).unwrap_err();
        assert_eq!(err(b"not json").0, errno::EPROTO);
        assert_eq!(err(br#"{"namespace":"kvs"}"#).0, errno::EPROTO);
        assert_eq!(
            err(br#"{"namespace":"kvs","methods":{},"x":1}"#).0,
            errno::EPROTO
        );
        assert_eq!(
            err(br#"{"namespace":"Kvs","methods":{"a":"user"}}"#).0,
            errno::EINVAL
        );
        assert_eq!(
            err(br#"{"namespace":"k\u0000","methods":{"a":"user"}}"#).0,
            errno::EINVAL
        );
        let long = format!(
            r#"{{"namespace":"{}","methods":{{"a":"user"}}}}"#,
            "k".repeat(65)
        );
        assert_eq!(err(long.as_bytes()).0, errno::EINVAL);
        assert_eq!(err(br#"{"namespace":"kvs","methods":{}}"#).0, errno::EINVAL);
        assert_eq!(
            err(br#"{"namespace":"kvs","methods":{"a b":"user"}}"#).0,
            errno::EINVAL
        );
        let e = err(br#"{"namespace":"kvs","methods":{"get":"wizard"}}"#);
        assert_eq!(e.0, errno::EINVAL);
        assert!(e.1.contains("unknown role \"wizard\""), "{}", e.1);
        assert_eq!(
            err(br#"{"namespace":"kvs","methods":{"get":"peer"}}"#).0,
            errno::EINVAL
        );
        for ns in RESERVED {
            let b = format!(r#"{{"namespace":"{ns}","methods":{{"a":"user"}}}}"#);
            assert_eq!(err(b.as_bytes()).0, errno::EPERM, "{ns}");
        }
        assert_eq!(parse_remove(br#"{"namespace":"kvs"}"#).unwrap(), "kvs");
        assert_eq!(parse_remove(b"{}").unwrap_err().0, errno::EPROTO);
    }

    #[test]
    fn own_namespace_events() {
        let offers = vec!["kvs".to_string()];
        let ev = |t: &str| {
            let mut b = (t.len() as u16).to_be_bytes().to_vec();
            b.extend_from_slice(t.as_bytes());
            b
        };
        assert!(BrokerCore::<Vec<u8>>::publishes_own_namespace(
            &offers,
            &ev("kvs.changed")
        ));
        assert!(!BrokerCore::<Vec<u8>>::publishes_own_namespace(
            &offers,
            &ev("kvsx.changed")
        ));
        assert!(!BrokerCore::<Vec<u8>>::publishes_own_namespace(
            &offers,
            &ev("kvs")
        ));
        assert!(!BrokerCore::<Vec<u8>>::publishes_own_namespace(
            &offers,
            &ev("job.x")
        ));
    }
}
