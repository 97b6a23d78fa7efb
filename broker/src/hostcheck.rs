//! `canopy config check --host H`: beyond the syntax, whether host H's
//! broker would start, and be reachable, with this config, as the service
//! user: every file the config points to (certificates, policy, audit log
//! directory, keytab) with its owner and mode, whether the node's public
//! and secret keys match, and whether its endpoints name interfaces and
//! addresses this host has and its neighbours' names resolve. Run it on
//! the host itself, as root or as the service user.

use canopy_config::{Config, Mechanism};
use canopy_security::trust::{check_trusted, TrustKind};
use std::net::ToSocketAddrs;
use std::path::Path;

/// One finding: `ok` or a problem with the fix.
pub struct Finding {
    pub ok: bool,
    pub text: String,
}

/// Check host `host` of `config` for a broker running as `user` (uid).
pub fn check(config: &Config, host: &str, user: (&str, u32)) -> Result<Vec<Finding>, String> {
    let rank = config
        .rank_of(host)
        .ok_or_else(|| format!("{host} is not in bootstrap.hosts; name a host of this config"))?;
    let (uname, uid) = user;
    let mut out = Vec::new();
    let mut ok = |text: String| out.push(Finding { ok: true, text });
    let mut found: Vec<Finding> = Vec::new();
    let mut problem = |text: String| found.push(Finding { ok: false, text });
    ok(format!("{host} is rank {rank} of {}", config.size()));

    let trusted = |path: &Path, kind: TrustKind, what: &str| -> Result<String, String> {
        check_trusted(path, kind, uid)
            .map(|_| {
                let md = std::fs::metadata(path).ok();
                let (o, m) = md
                    .map(|m| {
                        use std::os::unix::fs::{MetadataExt, PermissionsExt};
                        (m.uid(), m.permissions().mode() & 0o7777)
                    })
                    .unwrap_or_default();
                format!("{what} {} (owner uid {o}, mode {m:04o})", path.display())
            })
            .map_err(|e| format!("{what}: {e}"))
    };
    if config.mechanism() == Mechanism::Curve {
        match config.cert_path(rank) {
            None => problem("no bootstrap.curve_cert: this broker has no secret certificate; set it, e.g. \"/etc/canopy/curve/%h.key_secret\"".into()),
            Some(secret) => match trusted(&secret, TrustKind::Secret, "secret certificate") {
                Err(e) => problem(e),
                Ok(t) => {
                    use std::os::unix::fs::MetadataExt;
                    let owner = std::fs::metadata(&secret).map(|m| m.uid()).unwrap_or(u32::MAX);
                    if owner != uid && uid != 0 {
                        problem(format!("{t}: {uname} (uid {uid}) cannot read it; run chown {uname} {}", secret.display()));
                    } else {
                        ok(format!("{t}, readable by {uname} only"));
                    }
                    let public = config.public_cert_path(rank);
                    // Parsed, not loaded: the trust check above was for
                    // the broker's user, who may not be the one running this.
                    let parsed = std::fs::read_to_string(&secret)
                        .map_err(|e| e.to_string())
                        .and_then(|t| canopy_security::cert::parse(&t, &secret).map_err(|e| e.to_string()));
                    match (parsed, public) {
                        (Err(e), _) => problem(format!("secret certificate: {e}")),
                        (Ok(s), Some(p)) => match canopy_security::cert::load_public(&p) {
                            Ok(pc) if pc.public == s.public => ok(format!("public certificate {} holds this node's key", p.display())),
                            Ok(_) => problem(format!("public certificate {} does not hold the public key of {}: the parent and children would refuse this node; copy the node's .pub over it", p.display(), secret.display())),
                            Err(e) => problem(format!("public certificate: {e}")),
                        },
                        (Ok(_), None) => problem("no bootstrap.curve_public_certs: neighbours cannot know this node's key".into()),
                    }
                }
            },
        }
        let topo = config.topology();
        let neighbours: Vec<u32> = topo
            .parent(rank)
            .into_iter()
            .chain(topo.children(rank).iter().copied())
            .collect();
        for n in neighbours {
            match config.public_cert_path(n) {
                Some(p) => match trusted(
                    &p,
                    TrustKind::File,
                    &format!("rank {n}'s public certificate"),
                ) {
                    Ok(t) => ok(t),
                    Err(e) => problem(e),
                },
                None => problem(format!("no public certificate for rank {n}")),
            }
        }
    }
    if let Some(g) = config.gssapi() {
        match &g.keytab {
            Some(kt) => match trusted(kt, TrustKind::Secret, "keytab") {
                Ok(t) => ok(t),
                Err(e) => problem(e),
            },
            None => ok("keytab: the Kerberos default (KRB5_KTNAME, else /etc/krb5.keytab)".into()),
        }
    }
    if let Some(p) = &config.policy().file {
        match trusted(p, TrustKind::File, "policy") {
            Err(e) => problem(e),
            Ok(t) => match canopy_acl::Acl::load(p) {
                Ok(_) => ok(t),
                Err(e) => problem(format!("policy: {e}")),
            },
        }
    }
    if let Some(a) = &config.policy().audit_log {
        let path = crate::authz::audit_path(a, rank, host);
        if let Some(dir) = path.parent() {
            match trusted(dir, TrustKind::Directory, "audit log directory") {
                Ok(t) => ok(format!("{t}; the log is {}", path.display())),
                Err(e) => problem(e),
            }
        }
    }
    // Endpoints: what this broker binds must be on this host.
    if let Some(bind) = config.bind_endpoint(rank) {
        match bind_host(&bind) {
            None => ok(format!("binds {bind}")),
            Some(h) => match local_address(&h) {
                Ok(what) => ok(format!("binds {bind} ({what})")),
                Err(e) => problem(format!("binds {bind}: {e}")),
            },
        }
    }
    let topo = config.topology();
    for n in topo
        .parent(rank)
        .into_iter()
        .chain(topo.children(rank).iter().copied())
    {
        if let Some(ep) = config.connect_endpoint(n) {
            match ep
                .strip_prefix("tcp://")
                .map(|hp| hp.to_socket_addrs().map(|mut a| a.next().is_some()))
            {
                Some(Ok(true)) => ok(format!("rank {n} is reached at {ep}")),
                Some(Ok(false)) => problem(format!("rank {n}'s endpoint {ep} has no address; fix it in the config or DNS")),
                Some(Err(e)) => problem(format!("rank {n}'s endpoint {ep} does not resolve ({e}); fix it in the config, DNS or /etc/hosts")),
                None => ok(format!("rank {n} is reached at {ep}")),
            }
        }
    }
    if let Some(ep) = config.client_endpoint(rank) {
        match bind_host(&ep) {
            Some(h) => match local_address(&h) {
                Ok(what) => ok(format!("accepts remote clients on {ep} ({what})")),
                Err(e) => problem(format!("[clients] bind {ep}: {e}")),
            },
            None => ok(format!("accepts remote clients on {ep}")),
        }
    }
    out.extend(found);
    Ok(out)
}

/// The host part of `tcp://HOST:PORT`, unless it binds every address.
fn bind_host(ep: &str) -> Option<String> {
    crate::gss::endpoint_host_port(ep)
        .map(|(h, _)| h)
        .filter(|h| h != "0.0.0.0" && h != "::")
}

/// Whether `h` (an interface name, an address or a host name) is on this
/// host: say what it is, or why not.
fn local_address(h: &str) -> Result<String, String> {
    let addrs = crate::iface::addresses().map_err(|e| e.to_string())?;
    if let Some((_, ip)) = addrs.iter().find(|(n, _)| n == h) {
        return Ok(format!("interface {h}, {ip}"));
    }
    if let Ok(ip) = h.parse::<std::net::IpAddr>() {
        return if addrs.iter().any(|(_, a)| *a == ip) {
            Ok(format!("{ip} is on this host"))
        } else {
            Err(format!("{ip} is not an address of this host; use one of its addresses, an interface name (ip -br addr) or *"))
        };
    }
    match (h, 0).to_socket_addrs() {
        Ok(list) => {
            let list: Vec<std::net::IpAddr> = list.map(|a| a.ip()).collect();
            match list.iter().find(|ip| addrs.iter().any(|(_, a)| a == *ip)) {
                Some(ip) => Ok(format!("{h} is {ip}, on this host")),
                None => Err(format!("{h} resolves to {list:?}, none of them on this host; run this on the host itself, or fix the name")),
            }
        }
        Err(e) => Err(format!("{h} is neither an interface of this host nor a name that resolves ({e}); interfaces: {}", {
            let mut names: Vec<&str> = addrs.iter().map(|(n, _)| n.as_str()).collect();
            names.dedup();
            names.join(", ")
        })),
    }
}
