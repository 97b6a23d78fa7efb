//! The validated configuration and the pure resolution of ranks, tree,
//! endpoints, certificates and the fingerprint.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::budgets::{self, BudgetKey, BudgetSettings};
use crate::error::{ConfigError, Location};
use crate::hostlist::{self, HostlistError, MAX_HOSTS};
use crate::raw::{self, Ctx, Pos, RawPublicCerts, Source, Val};
use crate::template::{self, Tokens};
use crate::tree::Tree;
use canopy_security::trust::{check_trusted, service_uid, TrustKind};
use std::io::Read as _;

/// `bootstrap.default_port` when not set (flux-core's examples use 8050).
pub const DEFAULT_PORT: u16 = 8050;
/// `bootstrap.default_bind` when not set: every interface, the default port.
pub const DEFAULT_BIND: &str = "tcp://*:%p";
/// `bootstrap.default_connect` when not set: the host's name, the default port.
pub const DEFAULT_CONNECT: &str = "tcp://%h:%p";

/// How brokers authenticate each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    /// ZeroMQ CURVE: each node has a secret certificate, and the public
    /// certificates of the others.
    Curve,
    /// Kerberos binding per-link CURVE keys (not libzmq's GSSAPI
    /// mechanism): see [`GssapiConfig`].
    Gssapi,
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mechanism::Curve => "curve",
            Mechanism::Gssapi => "gssapi",
        })
    }
}

/// `bootstrap.curve_public_certs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicCerts {
    /// A directory holding `<host>.key` for every host.
    Directory(PathBuf),
    /// One path per host, in rank order; each may use `%h`.
    List(Vec<String>),
}

/// One element of `bootstrap.hosts`, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    /// A hostlist, e.g. `node[0-127]`.
    pub host: String,
    /// Overrides `default_bind` for these hosts.
    pub bind: Option<String>,
    /// Overrides `default_connect` for these hosts.
    pub connect: Option<String>,
    /// The host name of these hosts' parent in the tree.
    pub parent: Option<String>,
    /// Where the entry's `host` key is.
    pub location: Location,
}

/// The `[bootstrap]` table, with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub default_port: u16,
    pub default_bind: String,
    pub default_connect: String,
    pub mechanism: Mechanism,
    /// This node's secret certificate; may use `%h`.
    pub curve_cert: Option<String>,
    pub curve_public_certs: Option<PublicCerts>,
    pub fanout: u32,
    pub hosts: Vec<HostEntry>,
}

/// The `[gssapi]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GssapiConfig {
    /// Kerberos service name; a broker's principal is `service/host@REALM`.
    pub service: String,
    /// The keytab holding this node's key; `None` uses the Kerberos default
    /// (`KRB5_KTNAME`, else `/etc/krb5.keytab`).
    pub keytab: Option<PathBuf>,
    /// The realm; `None` uses the Kerberos default realm.
    pub realm: Option<String>,
    /// TCP port of every broker's Kerberos key exchange, on the host of its
    /// connect endpoint; `None`: one more than the port of that endpoint.
    pub kex_port: Option<u16>,
    /// Most live key bindings one principal may hold at a broker's key
    /// exchange; `None`: the default (1,000).
    pub max_bindings_per_principal: Option<usize>,
}

impl GssapiConfig {
    /// The principal of the broker on `host`: `service/host@REALM`, or
    /// `service/host` when the realm is the default one. The host is used
    /// exactly as written in `bootstrap.hosts` (no case folding): principals
    /// are compared exactly, so write hosts as the KDC spells the
    /// principals' instances.
    pub fn principal(&self, host: &str) -> String {
        match &self.realm {
            Some(r) => format!("{}/{host}@{r}", self.service),
            None => format!("{}/{host}", self.service),
        }
    }
}

/// Default `gssapi.service`.
pub const DEFAULT_GSSAPI_SERVICE: &str = "canopy";

/// The `[timing]` table: link liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often each side of a link sends a heartbeat. Default 2 s.
    pub heartbeat: Duration,
    /// Silence after which a peer is torpid (still routed to, reported).
    /// Default 10 s: five missed heartbeats, enough to ride out a busy node.
    pub torpid: Duration,
    /// Silence after which a peer is lost (link dropped, requests failed).
    /// Default 30 s: long enough for a node's pause, short enough that a
    /// dead node's requests fail within a minute.
    pub lost: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            heartbeat: Duration::from_secs(2),
            torpid: Duration::from_secs(10),
            lost: Duration::from_secs(30),
        }
    }
}

impl Timing {
    /// The same timings in the overlay's units.
    pub fn to_liveness(&self) -> canopy_overlay::liveness::Timing {
        let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        // Parsing checked the order with file:line:col; sub-millisecond
        // settings round down, so keep the order after rounding too.
        let h = ms(self.heartbeat).max(1);
        let t = ms(self.torpid).max(h + 1);
        let l = ms(self.lost).max(t + 1);
        canopy_overlay::liveness::Timing::new(h, t, l).unwrap_or_default()
    }
}

/// The `[policy]` table: where the ACL policy and the audit log are. The
/// policy's content is parsed by `canopy-acl`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    pub file: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
}

/// The `[clients]` table: the remote client endpoint (users on
/// workstations): which hosts' brokers listen, and where. Clients
/// authenticate with the instance's mechanism (CURVE: the broker's public
/// key; gssapi: its key exchange) and the policy decides who gets in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientsConfig {
    /// `tcp://ADDR:PORT`; `%h` is the listening host.
    pub bind: String,
    /// The hosts whose brokers listen (default: rank 0's).
    pub hosts: Vec<String>,
}

/// A validated system-instance configuration.
#[derive(Debug, Clone)]
pub struct Config {
    files: Vec<PathBuf>,
    bootstrap: Bootstrap,
    gssapi: Option<GssapiConfig>,
    timing: Timing,
    policy: PolicyConfig,
    clients: Option<ClientsConfig>,
    /// `[exec] helper`: the setuid `canopy-imp` that runs `canopy exec`
    /// commands as their users; none: exec is off.
    exec_helper: Option<PathBuf>,
    budgets: BudgetSettings,
    /// expanded host names, in rank order
    hosts: Vec<String>,
    /// rank -> index into `bootstrap.hosts`
    entry_of: Vec<u32>,
    /// lower-case short name -> rank (short names are unique)
    by_short: HashMap<String, u32>,
    tree: Tree,
    fingerprint: String,
}

/// Refuse a path that group or others can write.
fn check_mode(path: &Path, meta: &fs::Metadata) -> Result<(), ConfigError> {
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(ConfigError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_checked(path: &Path) -> Result<Source, ConfigError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    check_mode(path, &meta)?;
    let trusted = check_trusted(path, TrustKind::File, service_uid())?;
    let mut bytes = Vec::new();
    trusted.open()?.read_to_end(&mut bytes).map_err(io(path))?;
    let text = String::from_utf8(bytes).map_err(|e| ConfigError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text ({e})"),
        ),
    })?;
    Ok(Source {
        path: path.to_path_buf(),
        text,
    })
}

impl Config {
    /// Load a configuration file, or a directory: every `*.toml` in it
    /// (not in subdirectories, not hidden), in lexical order, merged.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let meta = fs::metadata(path).map_err(io(path))?;
        if !meta.is_dir() {
            return Config::from_sources(vec![read_checked(path)?]);
        }
        check_mode(path, &meta)?;
        check_trusted(path, TrustKind::Directory, service_uid())?;
        let mut names = Vec::new();
        for entry in fs::read_dir(path).map_err(io(path))? {
            let entry = entry.map_err(io(path))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(".toml") {
                continue;
            }
            let full = entry.path();
            if fs::metadata(&full).map_err(io(&full))?.is_file() {
                names.push(name.to_string());
            }
        }
        if names.is_empty() {
            return Err(ConfigError::NoConfigFiles {
                dir: path.to_path_buf(),
            });
        }
        names.sort();
        let sources = names
            .iter()
            .map(|n| read_checked(&path.join(n)))
            .collect::<Result<Vec<_>, _>>()?;
        Config::from_sources(sources)
    }

    /// Parse one file's text; `file` names it in errors. Reads nothing.
    pub fn parse(text: &str, file: impl Into<PathBuf>) -> Result<Config, ConfigError> {
        Config::from_sources(vec![Source {
            path: file.into(),
            text: text.to_string(),
        }])
    }

    fn from_sources(sources: Vec<Source>) -> Result<Config, ConfigError> {
        let ctx = Ctx { sources: &sources };
        let merged = raw::parse_and_merge(&ctx)?;
        let mut config = build(&ctx, merged)?;
        config.files = sources.into_iter().map(|s| s.path).collect();
        Ok(config)
    }

    /// The files read, in merge order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn bootstrap(&self) -> &Bootstrap {
        &self.bootstrap
    }

    pub fn mechanism(&self) -> Mechanism {
        self.bootstrap.mechanism
    }

    /// `[gssapi]`, when present.
    pub fn gssapi(&self) -> Option<&GssapiConfig> {
        self.gssapi.as_ref()
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// `[exec] helper`, if exec is enabled.
    pub fn exec_helper(&self) -> Option<&Path> {
        self.exec_helper.as_deref()
    }

    pub fn policy(&self) -> &PolicyConfig {
        &self.policy
    }

    /// `[clients]`, if present.
    pub fn clients(&self) -> Option<&ClientsConfig> {
        self.clients.as_ref()
    }

    /// Where `rank`'s broker listens for remote clients, if it does.
    pub fn client_endpoint(&self, rank: u32) -> Option<String> {
        let c = self.clients.as_ref()?;
        let host = self.host(rank)?;
        c.hosts
            .iter()
            .any(|h| self.rank_of(h) == Some(rank))
            .then(|| template::substitute(&c.bind, host, self.bootstrap.default_port))
    }

    /// `[budgets]`, with defaults for the keys not set.
    pub fn budgets(&self) -> &BudgetSettings {
        &self.budgets
    }

    /// Number of brokers (hosts).
    pub fn size(&self) -> u32 {
        self.hosts.len() as u32
    }

    /// Every host name, in rank order.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// The host name of `rank`.
    pub fn host(&self, rank: u32) -> Option<&str> {
        self.hosts.get(rank as usize).map(String::as_str)
    }

    /// The rank of `hostname`: its index in the expanded host list. Names
    /// compare without regard to ASCII case. A short name matches a listed
    /// FQDN and an FQDN matches a listed short name, by the part before the
    /// first '.'; two different FQDNs never match each other.
    pub fn rank_of(&self, hostname: &str) -> Option<u32> {
        lookup(&self.by_short, &self.hosts, hostname)
    }

    /// Each rank's parent and children.
    pub fn topology(&self) -> &Tree {
        &self.tree
    }

    fn entry(&self, rank: u32) -> Option<(&HostEntry, &str)> {
        let host = self.hosts.get(rank as usize)?;
        let entry = &self.bootstrap.hosts[self.entry_of[rank as usize] as usize];
        Some((entry, host))
    }

    /// The ZeroMQ endpoint `rank` binds for its children.
    pub fn bind_endpoint(&self, rank: u32) -> Option<String> {
        let (entry, host) = self.entry(rank)?;
        let tpl = entry
            .bind
            .as_deref()
            .unwrap_or(&self.bootstrap.default_bind);
        Some(template::substitute(tpl, host, self.bootstrap.default_port))
    }

    /// The ZeroMQ endpoint `rank`'s children connect to to reach it.
    pub fn connect_endpoint(&self, rank: u32) -> Option<String> {
        let (entry, host) = self.entry(rank)?;
        let tpl = entry
            .connect
            .as_deref()
            .unwrap_or(&self.bootstrap.default_connect);
        Some(template::substitute(tpl, host, self.bootstrap.default_port))
    }

    /// `rank`'s secret CURVE certificate (`curve_cert` with `%h`), read by
    /// that rank only.
    pub fn cert_path(&self, rank: u32) -> Option<PathBuf> {
        let host = self.host(rank)?;
        let tpl = self.bootstrap.curve_cert.as_deref()?;
        Some(PathBuf::from(template::substitute(
            tpl,
            host,
            self.bootstrap.default_port,
        )))
    }

    /// `rank`'s public CURVE certificate: `<dir>/<host>.key`, or the
    /// rank's element of an explicit list.
    pub fn public_cert_path(&self, rank: u32) -> Option<PathBuf> {
        let host = self.host(rank)?;
        match self.bootstrap.curve_public_certs.as_ref()? {
            PublicCerts::Directory(dir) => Some(dir.join(format!("{host}.key"))),
            PublicCerts::List(list) => {
                let tpl = list.get(rank as usize)?;
                Some(PathBuf::from(template::substitute(
                    tpl,
                    host,
                    self.bootstrap.default_port,
                )))
            }
        }
    }

    /// Hex SHA-256 of the canonical host list, tree and mechanism. Brokers
    /// exchange it at hello and refuse a peer whose value differs: that
    /// peer was started with a different host list (flux-core #6389).
    /// Formatting, comments, hostlist spelling, file layout and endpoints
    /// do not change it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A short human summary, for `canopy config check`.
    pub fn summary(&self) -> String {
        let kary = match self.tree.kary() {
            Some(_) => format!("k-ary, fanout {}", self.tree.fanout()),
            None => "custom (parent keys)".to_string(),
        };
        format!(
            "{} hosts: {}\ntree: {}, height {}\nmechanism: {}\nfingerprint: {}\n",
            self.size(),
            hostlist::compress(&self.hosts),
            kary,
            self.tree.height(),
            self.bootstrap.mechanism,
            self.fingerprint
        )
    }
}

fn short(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

fn lookup(by_short: &HashMap<String, u32>, hosts: &[String], name: &str) -> Option<u32> {
    let lower = name.to_ascii_lowercase();
    let rank = *by_short.get(short(&lower))?;
    let listed = &hosts[rank as usize];
    if listed.eq_ignore_ascii_case(name) || !name.contains('.') || !listed.contains('.') {
        Some(rank)
    } else {
        None
    }
}

/// Build and validate the configuration from the merged keys.
fn build(ctx: &Ctx<'_>, m: raw::Merged) -> Result<Config, ConfigError> {
    let bootstrap_at = m
        .bootstrap_at
        .clone()
        .ok_or_else(|| ConfigError::MissingKey {
            at: ctx.loc(&ctx.start()),
            key: "bootstrap".to_string(),
            hint: "add a [bootstrap] table with at least `hosts` (see docs/config.md)".to_string(),
        })?;

    // ports and shape
    let default_port = match &m.default_port {
        None => DEFAULT_PORT,
        Some(v) => u16::try_from(v.value)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| ConfigError::BadPort {
                at: ctx.loc(&v.pos),
                key: "bootstrap.default_port".to_string(),
                port: v.value,
            })?,
    };
    let fanout = match &m.fanout {
        None => canopy_overlay::topology::DEFAULT_FANOUT,
        Some(v) => u32::try_from(v.value)
            .ok()
            .filter(|f| *f >= 1 && (*f as usize) <= MAX_HOSTS)
            .ok_or_else(|| ConfigError::Invalid {
                at: ctx.loc(&v.pos),
                key: "bootstrap.fanout".to_string(),
                message: format!("fanout {} is out of range; use a number of children per broker from 1 to {MAX_HOSTS} (2 is flux-core's default)", v.value),
            })?,
    };
    let mechanism = m.mechanism.as_ref().map_or(Mechanism::Curve, |v| v.value);

    // templates
    let tokens = |v: &Val<String>, key: &str, allowed: Tokens| check_tokens(ctx, v, key, allowed);
    let default_bind = text_or(&m.default_bind, DEFAULT_BIND, &bootstrap_at);
    let default_connect = text_or(&m.default_connect, DEFAULT_CONNECT, &bootstrap_at);
    tokens(&default_bind, "bootstrap.default_bind", Tokens::HostPort)?;
    tokens(
        &default_connect,
        "bootstrap.default_connect",
        Tokens::HostPort,
    )?;

    // certificates
    let absolute =
        |v: &Val<String>, key: &str, allowed: Tokens| check_absolute(ctx, v, key, allowed);
    if let Some(v) = &m.curve_cert {
        absolute(v, "bootstrap.curve_cert", Tokens::Host)?;
    }
    let curve_public_certs = match &m.curve_public_certs {
        None => None,
        Some(Val {
            value: RawPublicCerts::Dir(dir),
            pos,
        }) => {
            let v = Val {
                value: dir.clone(),
                pos: pos.clone(),
            };
            absolute(&v, "bootstrap.curve_public_certs", Tokens::None)?;
            Some(PublicCerts::Directory(PathBuf::from(dir)))
        }
        Some(Val {
            value: RawPublicCerts::List(list),
            pos,
        }) => {
            for (i, e) in list.iter().enumerate() {
                let v = Val {
                    value: e.get_ref().clone(),
                    pos: Pos {
                        file: pos.file,
                        span: e.span(),
                    },
                };
                absolute(
                    &v,
                    &format!("bootstrap.curve_public_certs[{i}]"),
                    Tokens::Host,
                )?;
            }
            Some(PublicCerts::List(
                list.iter().map(|e| e.get_ref().clone()).collect(),
            ))
        }
    };

    // hosts
    let hosts_val = m.hosts.as_ref().ok_or_else(|| ConfigError::MissingKey {
        at: ctx.loc(&bootstrap_at),
        key: "bootstrap.hosts".to_string(),
        hint: "list every broker's host in rank order, e.g. hosts = [ { host = \"node[0-127]\" } ]"
            .to_string(),
    })?;
    let file = hosts_val.pos.file;
    let at = |span: std::ops::Range<usize>| ctx.loc(&Pos { file, span });
    if hosts_val.value.is_empty() {
        return Err(ConfigError::Invalid {
            at: ctx.loc(&hosts_val.pos),
            key: "bootstrap.hosts".to_string(),
            message: "the host list is empty; list every broker's host, rank 0 first".to_string(),
        });
    }
    let bad_hostlist =
        |i: usize, e: &raw::RawHost, source: HostlistError| ConfigError::BadHostlist {
            at: at(within_string(
                ctx,
                file,
                e.host.span(),
                e.host.get_ref(),
                source.position(),
            )),
            key: format!("bootstrap.hosts[{i}].host"),
            value: e.host.get_ref().clone(),
            source: Box::new(source),
        };
    // count first, so an oversized list is refused before anything is expanded
    let mut total = 0usize;
    for (i, spanned) in hosts_val.value.iter().enumerate() {
        let e = spanned.get_ref();
        total += hostlist::count(e.host.get_ref()).map_err(|source| bad_hostlist(i, e, source))?;
        if total > MAX_HOSTS {
            return Err(bad_hostlist(i, e, HostlistError::TooLarge));
        }
    }
    let mut hosts: Vec<String> = Vec::with_capacity(total);
    let mut entry_of: Vec<u32> = Vec::with_capacity(total);
    let mut ranges: Vec<std::ops::Range<u32>> = Vec::new();
    let mut by_short: HashMap<String, u32> = HashMap::new();
    let mut entries: Vec<HostEntry> = Vec::new();
    for (i, spanned) in hosts_val.value.iter().enumerate() {
        let e = spanned.get_ref();
        let key = format!("bootstrap.hosts[{i}]");
        let host_at = at(e.host.span());
        let expanded =
            hostlist::expand(e.host.get_ref()).map_err(|source| bad_hostlist(i, e, source))?;
        for (name, field) in [(&e.bind, "bind"), (&e.connect, "connect")] {
            if let Some(v) = name {
                let v = Val {
                    value: v.get_ref().clone(),
                    pos: Pos {
                        file,
                        span: v.span(),
                    },
                };
                tokens(&v, &format!("{key}.{field}"), Tokens::HostPort)?;
            }
        }
        let first_rank = hosts.len() as u32;
        for name in expanded {
            let lower_short = short(&name).to_ascii_lowercase();
            if let Some(&r) = by_short.get(&lower_short) {
                let other = &hosts[r as usize];
                let first_entry = &hosts_val.value[entry_of[r as usize] as usize];
                let why = if other.eq_ignore_ascii_case(&name) {
                    String::new()
                } else {
                    format!(" as `{other}` (host names must differ before the first '.')")
                };
                return Err(ConfigError::DuplicateHost {
                    at: host_at,
                    key: format!("{key}.host"),
                    host: name,
                    first: Box::new(at(first_entry.get_ref().host.span())),
                    why,
                });
            }
            by_short.insert(lower_short, hosts.len() as u32);
            hosts.push(name);
            entry_of.push(i as u32);
        }
        ranges.push(first_rank..hosts.len() as u32);
        entries.push(HostEntry {
            host: e.host.get_ref().clone(),
            bind: e.bind.as_ref().map(|v| v.get_ref().clone()),
            connect: e.connect.as_ref().map(|v| v.get_ref().clone()),
            parent: e.parent.as_ref().map(|v| v.get_ref().clone()),
            location: host_at,
        });
    }
    let size = hosts.len();

    // endpoints: check each template once, with the first host using it
    let check_endpoint = |tpl: &str, host: &str, pos: &Pos, key: &str| -> Result<(), ConfigError> {
        endpoint_ok(&template::substitute(tpl, host, default_port)).map_err(|problem| match problem
        {
            EndpointProblem::Port(port) => ConfigError::BadPort {
                at: ctx.loc(pos),
                key: key.to_string(),
                port,
            },
            EndpointProblem::Form(message) => ConfigError::Invalid {
                at: ctx.loc(pos),
                key: key.to_string(),
                message,
            },
        })
    };
    check_endpoint(
        &default_bind.value,
        &hosts[0],
        &default_bind.pos,
        "bootstrap.default_bind",
    )?;
    check_endpoint(
        &default_connect.value,
        &hosts[0],
        &default_connect.pos,
        "bootstrap.default_connect",
    )?;
    for (i, spanned) in hosts_val.value.iter().enumerate() {
        let e = spanned.get_ref();
        let host = &hosts[ranges[i].start as usize];
        if let Some(b) = &e.bind {
            check_endpoint(
                b.get_ref(),
                host,
                &Pos {
                    file,
                    span: b.span(),
                },
                &format!("bootstrap.hosts[{i}].bind"),
            )?;
        }
        if let Some(c) = &e.connect {
            check_endpoint(
                c.get_ref(),
                host,
                &Pos {
                    file,
                    span: c.span(),
                },
                &format!("bootstrap.hosts[{i}].connect"),
            )?;
        }
    }

    // tree: k-ary default, explicit parents override
    let mut parents: Vec<Option<u32>> = (0..size as u32)
        .map(|r| Tree::kary_parent(r, fanout))
        .collect();
    let mut explicit: Vec<Option<usize>> = vec![None; size];
    for (i, spanned) in hosts_val.value.iter().enumerate() {
        let Some(p) = &spanned.get_ref().parent else {
            continue;
        };
        let key = format!("bootstrap.hosts[{i}].parent");
        let parent_rank =
            lookup(&by_short, &hosts, p.get_ref()).ok_or_else(|| ConfigError::UnknownParent {
                at: at(p.span()),
                key: key.clone(),
                parent: p.get_ref().clone(),
            })?;
        for r in ranges[i].clone() {
            if r == 0 {
                return Err(ConfigError::RootHasParent {
                    at: at(p.span()),
                    key,
                    host: hosts[0].clone(),
                });
            }
            parents[r as usize] = Some(parent_rank);
            explicit[r as usize] = Some(i);
        }
    }
    if let Some(cycle) = find_cycle(&parents) {
        // default edges always point to a lower rank, so a cycle holds an
        // explicit parent: blame it
        let entry = cycle
            .iter()
            .find_map(|r| explicit[*r as usize])
            .unwrap_or(0);
        let p = hosts_val.value[entry].get_ref().parent.as_ref();
        let span = p.map_or(hosts_val.value[entry].span(), |p| p.span());
        let mut names: Vec<&str> = cycle
            .iter()
            .take(8)
            .map(|r| hosts[*r as usize].as_str())
            .collect();
        if cycle.len() > 8 {
            names.push("...");
        }
        names.push(&hosts[cycle[0] as usize]);
        return Err(ConfigError::ParentCycle {
            at: at(span),
            key: format!("bootstrap.hosts[{entry}].parent"),
            cycle: names.join(" -> "),
            root: hosts[0].clone(),
        });
    }
    let tree = Tree::from_parents(parents, fanout);

    // mechanism
    if mechanism == Mechanism::Curve && size > 1 {
        if m.curve_cert.is_none() {
            return Err(ConfigError::MissingKey {
                at: ctx.loc(&bootstrap_at),
                key: "bootstrap.curve_cert".to_string(),
                hint: "mechanism is curve and there is more than one host: set it to this node's secret certificate, e.g. \"/etc/canopy/curve/%h.key_secret\"".to_string(),
            });
        }
        if m.curve_public_certs.is_none() {
            return Err(ConfigError::MissingKey {
                at: ctx.loc(&bootstrap_at),
                key: "bootstrap.curve_public_certs".to_string(),
                hint: "mechanism is curve and there is more than one host: set it to the directory of <host>.key public certificates".to_string(),
            });
        }
    }
    if let (Some(PublicCerts::List(list)), Some(v)) = (&curve_public_certs, &m.curve_public_certs) {
        if list.len() != size {
            return Err(ConfigError::Invalid {
                at: ctx.loc(&v.pos),
                key: "bootstrap.curve_public_certs".to_string(),
                message: format!(
                    "the list has {} paths but bootstrap.hosts names {size} hosts; give one path per host in rank order, or a directory of <host>.key files",
                    list.len()
                ),
            });
        }
    }
    let gssapi = build_gssapi(ctx, &m, mechanism)?;
    let timing = build_timing(ctx, &m)?;
    let budgets = build_budgets(ctx, &m)?;
    let mut policy = PolicyConfig::default();
    if let Some(v) = &m.policy_file {
        absolute(v, "policy.file", Tokens::None)?;
        policy.file = Some(PathBuf::from(&v.value));
    }
    if let Some(v) = &m.audit_log {
        absolute(v, "policy.audit_log", Tokens::HostRank)?;
        policy.audit_log = Some(PathBuf::from(&v.value));
    }

    let clients = match (&m.clients_bind, &m.clients_hosts) {
        (None, None) => None,
        (None, Some(v)) => {
            return Err(ConfigError::Invalid {
                at: ctx.loc(&v.pos),
                key: "clients.bind".to_string(),
                message: "[clients] needs bind, the endpoint remote clients connect to, e.g. bind = \"tcp://*:7700\"".to_string(),
            })
        }
        (Some(b), listed) => {
            check_tokens(ctx, b, "clients.bind", Tokens::Host)?;
            let invalid = |pos: &Pos, key: &str, message: String| ConfigError::Invalid {
                at: ctx.loc(pos),
                key: key.to_string(),
                message,
            };
            if !b.value.starts_with("tcp://") {
                return Err(invalid(
                    &b.pos,
                    "clients.bind",
                    format!("'{}' is not a tcp:// endpoint; remote clients connect over TCP, e.g. tcp://*:7700", b.value),
                ));
            }
            check_endpoint(&b.value, &hosts[0], &b.pos, "clients.bind")?;
            let hosts_of = match listed {
                None => vec![hosts[0].clone()],
                Some(v) => {
                    if v.value.is_empty() {
                        return Err(invalid(&v.pos, "clients.hosts", "the list is empty; name the hosts whose brokers accept remote clients, or leave it out for rank 0's".to_string()));
                    }
                    for h in &v.value {
                        if lookup(&by_short, &hosts, h).is_none() {
                            return Err(invalid(
                                &v.pos,
                                "clients.hosts",
                                format!("{h} is not in bootstrap.hosts; name hosts of this instance"),
                            ));
                        }
                    }
                    v.value.clone()
                }
            };
            Some(ClientsConfig {
                bind: b.value.clone(),
                hosts: hosts_of,
            })
        }
    };

    let exec_helper = match &m.exec_helper {
        Some(v) => {
            absolute(v, "exec.helper", Tokens::None)?;
            Some(PathBuf::from(&v.value))
        }
        None => None,
    };
    let fingerprint = fingerprint(&hosts, &tree, mechanism);
    Ok(Config {
        files: Vec::new(),
        bootstrap: Bootstrap {
            default_port,
            default_bind: default_bind.value,
            default_connect: default_connect.value,
            mechanism,
            curve_cert: m.curve_cert.map(|v| v.value),
            curve_public_certs,
            fanout,
            hosts: entries,
        },
        gssapi,
        timing,
        policy,
        exec_helper,
        clients,
        budgets,
        hosts,
        entry_of,
        by_short,
        tree,
        fingerprint,
    })
}

/// Refuse a `%` token that `key` may not use.
fn check_tokens(
    ctx: &Ctx<'_>,
    v: &Val<String>,
    key: &str,
    allowed: Tokens,
) -> Result<(), ConfigError> {
    match template::bad_token(&v.value, allowed) {
        None => Ok(()),
        Some((_, token)) => Err(ConfigError::BadToken {
            at: ctx.loc(&v.pos),
            key: key.to_string(),
            token,
            value: v.value.clone(),
            allowed: allowed.describe(),
        }),
    }
}

/// Refuse a relative path (relative to what? the broker's cwd is no
/// place for a system configuration to depend on).
fn check_absolute(
    ctx: &Ctx<'_>,
    v: &Val<String>,
    key: &str,
    allowed: Tokens,
) -> Result<(), ConfigError> {
    check_tokens(ctx, v, key, allowed)?;
    if !v.value.starts_with('/') {
        return Err(ConfigError::Invalid {
            at: ctx.loc(&v.pos),
            key: key.to_string(),
            message: format!(
                "{:?} is not an absolute path; write the full path, starting with '/'",
                v.value
            ),
        });
    }
    Ok(())
}

/// The span of character `pos` (1-based) of a string value, when the
/// source spells the string without escapes; else the whole value.
fn within_string(
    ctx: &Ctx<'_>,
    file: usize,
    span: std::ops::Range<usize>,
    value: &str,
    pos: Option<usize>,
) -> std::ops::Range<usize> {
    let raw = ctx.sources[file].text.get(span.clone()).unwrap_or("");
    let quoted = raw.len() == value.len() + 2 && raw.get(1..raw.len() - 1) == Some(value);
    match pos {
        Some(p) if quoted && p >= 1 => {
            let byte = value
                .char_indices()
                .nth(p - 1)
                .map_or(value.len(), |(b, _)| b);
            let start = span.start + 1 + byte;
            start..start
        }
        _ => span,
    }
}

/// A set value, or the default placed at `at` (for error locations).
fn text_or(v: &Option<Val<String>>, default: &str, at: &Pos) -> Val<String> {
    v.clone().unwrap_or_else(|| Val {
        value: default.to_string(),
        pos: at.clone(),
    })
}

enum EndpointProblem {
    Port(i64),
    Form(String),
}

/// `tcp://ADDRESS:PORT` with a numeric port, or `ipc:///path`.
fn endpoint_ok(ep: &str) -> Result<(), EndpointProblem> {
    if let Some(rest) = ep.strip_prefix("tcp://") {
        let Some((addr, port)) = rest.rsplit_once(':') else {
            return Err(EndpointProblem::Form(format!(
                "endpoint {ep:?} has no port; write tcp://ADDRESS:PORT, e.g. \"tcp://%h:%p\""
            )));
        };
        if addr.is_empty() {
            return Err(EndpointProblem::Form(format!(
                "endpoint {ep:?} has no address; write an interface, address, host name or '*' before the port"
            )));
        }
        if port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) {
            return Err(EndpointProblem::Form(format!(
                "endpoint {ep:?} has port {port:?}, which is not a number; use a numeric port or %p"
            )));
        }
        let n = port.parse::<i64>().unwrap_or(i64::MAX);
        if !(1..=65535).contains(&n) {
            return Err(EndpointProblem::Port(n));
        }
        return Ok(());
    }
    if let Some(path) = ep.strip_prefix("ipc://") {
        if path.starts_with('/') {
            return Ok(());
        }
    }
    Err(EndpointProblem::Form(format!(
        "endpoint {ep:?} is not tcp://ADDRESS:PORT (or ipc:///absolute/path for brokers on one machine); fix the endpoint"
    )))
}

/// A cycle in the parent graph, as ranks in parent order.
fn find_cycle(parents: &[Option<u32>]) -> Option<Vec<u32>> {
    const NEW: u8 = 0;
    const ACTIVE: u8 = 1;
    const DONE: u8 = 2;
    let mut state = vec![NEW; parents.len()];
    let mut path: Vec<u32> = Vec::new();
    for start in 0..parents.len() {
        let mut r = start;
        path.clear();
        while state[r] == NEW {
            state[r] = ACTIVE;
            path.push(r as u32);
            match parents[r] {
                Some(p) => r = p as usize,
                None => break,
            }
        }
        if state[r] == ACTIVE && parents[r].is_some() && path.contains(&(r as u32)) {
            let from = path.iter().position(|x| *x as usize == r).unwrap_or(0);
            return Some(path[from..].to_vec());
        }
        for x in &path {
            state[*x as usize] = DONE;
        }
    }
    None
}

fn build_gssapi(
    ctx: &Ctx<'_>,
    m: &raw::Merged,
    mechanism: Mechanism,
) -> Result<Option<GssapiConfig>, ConfigError> {
    let Some(_) = &m.gssapi_at else {
        if mechanism == Mechanism::Gssapi {
            let pos = m
                .mechanism
                .as_ref()
                .map(|v| v.pos.clone())
                .unwrap_or_else(|| ctx.start());
            return Err(ConfigError::MissingGssapi {
                at: ctx.loc(&pos),
                key: "bootstrap.mechanism".to_string(),
            });
        }
        return Ok(None);
    };
    let word = |v: &Val<String>, key: &str, what: &str| -> Result<(), ConfigError> {
        let ok = !v.value.is_empty()
            && v.value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                at: ctx.loc(&v.pos),
                key: key.to_string(),
                message: format!(
                    "{:?} is not a valid {what}; use letters, digits, '-', '_' and '.' (no '/', '@' or spaces)",
                    v.value
                ),
            })
        }
    };
    let service = match &m.service {
        Some(v) => {
            word(v, "gssapi.service", "service name")?;
            v.value.clone()
        }
        None => DEFAULT_GSSAPI_SERVICE.to_string(),
    };
    let keytab = match &m.keytab {
        Some(v) => {
            check_absolute(ctx, v, "gssapi.keytab", Tokens::None)?;
            Some(PathBuf::from(&v.value))
        }
        None => None,
    };
    let realm = match &m.realm {
        Some(v) => {
            word(v, "gssapi.realm", "realm")?;
            Some(v.value.clone())
        }
        None => None,
    };
    let kex_port = match &m.kex_port {
        None => None,
        Some(v) => Some(
            u16::try_from(v.value)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| ConfigError::BadPort {
                    at: ctx.loc(&v.pos),
                    key: "gssapi.kex_port".to_string(),
                    port: v.value,
                })?,
        ),
    };
    let max_bindings_per_principal = match &m.max_bindings_per_principal {
        None => None,
        Some(v) => Some(
            usize::try_from(v.value)
                .ok()
                .filter(|n| (1..=65_536).contains(n))
                .ok_or_else(|| ConfigError::Invalid {
                    at: ctx.loc(&v.pos),
                    key: "gssapi.max_bindings_per_principal".to_string(),
                    message: format!(
                        "{} is out of range; use a number of live key bindings per principal from 1 to 65536 (default 1000)",
                        v.value
                    ),
                })?,
        ),
    };
    Ok(Some(GssapiConfig {
        service,
        keytab,
        realm,
        kex_port,
        max_bindings_per_principal,
    }))
}

/// `[budgets]`: each key a positive size (integer bytes or `"16MiB"`) or
/// count, within range and in order (see [`BudgetSettings::check`]).
fn build_budgets(ctx: &Ctx<'_>, m: &raw::Merged) -> Result<BudgetSettings, ConfigError> {
    let mut b = BudgetSettings::default();
    for (k, v) in BudgetKey::ALL.into_iter().zip(&m.budgets) {
        let Some(v) = v else { continue };
        let key = format!("budgets.{}", k.name());
        let invalid = |message: String| ConfigError::Invalid {
            at: ctx.loc(&v.pos),
            key: key.clone(),
            message,
        };
        let n = match &v.value {
            raw::RawSize::Int(n) => u64::try_from(*n).map_err(|_| {
                invalid(format!(
                    "{n} is negative; give a positive {} (default {})",
                    if k.is_size() {
                        "number of bytes"
                    } else {
                        "number"
                    },
                    BudgetSettings::default().get(k)
                ))
            })?,
            raw::RawSize::Str(s) if k.is_size() => budgets::parse_size(s).map_err(invalid)?,
            raw::RawSize::Str(s) => {
                return Err(invalid(format!(
                    "{s:?} is a string; give a plain integer, e.g. {}",
                    BudgetSettings::default().get(k)
                )))
            }
        };
        b.set(k, n);
    }
    b.check(|k| m.budgets[k as usize].is_some()).map_err(|p| {
        let v = m.budgets[p.key as usize].as_ref();
        ConfigError::Invalid {
            at: ctx.loc(&v.map_or_else(|| ctx.start(), |v| v.pos.clone())),
            key: format!("budgets.{}", p.key.name()),
            message: p.message,
        }
    })?;
    Ok(b)
}

fn build_timing(ctx: &Ctx<'_>, m: &raw::Merged) -> Result<Timing, ConfigError> {
    let defaults = Timing::default();
    let secs =
        |v: &Option<Val<f64>>, key: &str, default: Duration| -> Result<Duration, ConfigError> {
            let Some(v) = v else { return Ok(default) };
            if !(v.value.is_finite() && (0.001..=86_400.0).contains(&v.value)) {
                return Err(ConfigError::Invalid {
                    at: ctx.loc(&v.pos),
                    key: key.to_string(),
                    message: format!(
                        "{} is not a usable time; give seconds from 0.001 to 86400, e.g. {}",
                        v.value,
                        default.as_secs_f64()
                    ),
                });
            }
            Ok(Duration::from_secs_f64(v.value))
        };
    let heartbeat = secs(&m.heartbeat, "timing.heartbeat", defaults.heartbeat)?;
    let torpid = secs(&m.torpid, "timing.torpid", defaults.torpid)?;
    let lost = secs(&m.lost, "timing.lost", defaults.lost)?;
    let order = |short: Duration,
                 long: Duration,
                 short_key: &str,
                 long_key: &str,
                 short_v: &Option<Val<f64>>,
                 long_v: &Option<Val<f64>>|
     -> Result<(), ConfigError> {
        if short < long {
            return Ok(());
        }
        // blame the key that was set (the longer one if both were)
        let (pos, key) = match (long_v, short_v) {
            (Some(l), _) => (l.pos.clone(), long_key),
            (None, Some(s)) => (s.pos.clone(), short_key),
            (None, None) => (ctx.start(), long_key),
        };
        Err(ConfigError::Invalid {
            at: ctx.loc(&pos),
            key: key.to_string(),
            message: format!(
                "{long_key} ({} s) must be longer than {short_key} ({} s); raise {long_key} or lower {short_key}",
                long.as_secs_f64(),
                short.as_secs_f64()
            ),
        })
    };
    order(
        heartbeat,
        torpid,
        "timing.heartbeat",
        "timing.torpid",
        &m.heartbeat,
        &m.torpid,
    )?;
    order(
        torpid,
        lost,
        "timing.torpid",
        "timing.lost",
        &m.torpid,
        &m.lost,
    )?;
    Ok(Timing {
        heartbeat,
        torpid,
        lost,
    })
}

/// The canonical form: version, mechanism, size, then `host parent` per rank.
fn fingerprint(hosts: &[String], tree: &Tree, mechanism: Mechanism) -> String {
    let mut h = Sha256::new();
    h.update(b"canopy-config-fingerprint-v1\n");
    h.update(format!("mechanism {mechanism}\nsize {}\n", hosts.len()).as_bytes());
    for (rank, host) in hosts.iter().enumerate() {
        h.update(host.as_bytes());
        match tree.parent(rank as u32) {
            Some(p) => h.update(format!(" {p}\n").as_bytes()),
            None => h.update(b" -\n"),
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert!(endpoint_ok("tcp://eth0:8050").is_ok());
        assert!(endpoint_ok("tcp://*:1").is_ok());
        assert!(endpoint_ok("tcp://[::1]:65535").is_ok());
        assert!(endpoint_ok("ipc:///run/canopy/0").is_ok());
        assert!(matches!(
            endpoint_ok("tcp://x:0"),
            Err(EndpointProblem::Port(0))
        ));
        assert!(matches!(
            endpoint_ok("tcp://x:70000"),
            Err(EndpointProblem::Port(70000))
        ));
        assert!(matches!(
            endpoint_ok("tcp://x"),
            Err(EndpointProblem::Form(_))
        ));
        assert!(matches!(
            endpoint_ok("tcp://:80"),
            Err(EndpointProblem::Form(_))
        ));
        assert!(matches!(
            endpoint_ok("tcp://x:http"),
            Err(EndpointProblem::Form(_))
        ));
        assert!(matches!(
            endpoint_ok("udp://x:1"),
            Err(EndpointProblem::Form(_))
        ));
        assert!(matches!(
            endpoint_ok("ipc://rel"),
            Err(EndpointProblem::Form(_))
        ));
    }

    #[test]
    fn cycles_are_found() {
        assert_eq!(find_cycle(&[None, Some(0), Some(0)]), None);
        assert_eq!(find_cycle(&[None, Some(2), Some(1)]), Some(vec![1, 2]));
        assert_eq!(find_cycle(&[None, Some(1)]), Some(vec![1]));
        // a chain that runs into a cycle reports only the cycle
        assert_eq!(
            find_cycle(&[None, Some(2), Some(3), Some(2)]),
            Some(vec![2, 3])
        );
    }
}
