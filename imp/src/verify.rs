//! The helper's decision, pure: the checks of issue 14 in their order,
//! with the clock, the replay cache, the account database and the command
//! lookup injected, so each refusal is unit-tested deterministically.
//!
//! 1. the certificate (signed by a trusted CA, or an accepted node
//!    attestation; within its validity window) and the user's signature
//!    on the request with the certified key, for the certified principal;
//! 2. the audience: this instance, this rank among `ranks`, and the
//!    submitter the audience names (the user, or the delegated service);
//! 3. not expired (and a lifetime within `max_request_lifetime`);
//! 4. the nonce unseen (the replay cache records it);
//! 5. the certificate's local user allowed by imp.toml, never root;
//! 6. the command allowed.

use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use crate::cert::{CertError, CertKind, UserCert};
use crate::config::ImpConfig;
use crate::envelope::{
    key_id, sha256_hex, Envelope, EnvelopeError, UnixTime, EXEC_REQUEST_TYPE, USER_CERT_TYPE,
};
use crate::replay::{replay_key, ReplayCache, ReplayError};
use crate::request::{Audience, ExecRequest, RequestError};

/// Seconds a clock may be ahead of ours (a certificate's `not_before`, a
/// request's `issued_at`).
pub const CLOCK_SKEW: u64 = 60;

/// A local account, as the helper will run the command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (with the primary one).
    pub groups: Vec<u32>,
    pub home: PathBuf,
    pub shell: PathBuf,
}

/// The account database (`getpwnam`, `getgrouplist`, `getgrnam`).
pub trait Accounts {
    fn user(&self, name: &str) -> Option<Account>;
    fn group_gid(&self, name: &str) -> Option<u32>;
}

/// Who handed the request to the broker, as the broker authenticated it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Submitter {
    /// A user principal (`alice@REALM`).
    User(String),
    /// A service registered through the services mechanism.
    Service(String),
}

impl Submitter {
    /// `service:NAME` or a principal.
    pub fn parse(s: &str) -> Submitter {
        match s.strip_prefix("service:") {
            Some(n) => Submitter::Service(n.to_owned()),
            None => Submitter::User(s.to_owned()),
        }
    }
}

impl std::fmt::Display for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Submitter::User(p) => f.write_str(p),
            Submitter::Service(n) => write!(f, "service:{n}"),
        }
    }
}

/// Where and for whom the helper is running.
#[derive(Clone, Debug)]
pub struct Target {
    pub instance: String,
    pub rank: u32,
    pub submitter: Submitter,
}

/// The trust roots.
pub struct Roots<'a> {
    pub config: &'a ImpConfig,
    pub cas: &'a [VerifyingKey],
    pub nodes: &'a [VerifyingKey],
}

/// Everything the privileged steps need, once every check passed.
#[derive(Clone, Debug)]
pub struct Approved {
    pub request: ExecRequest,
    pub cert: UserCert,
    pub account: Account,
    /// The program to exec (argv[0] resolved).
    pub program: PathBuf,
    /// SHA-256 hex of the request envelope's exact bytes.
    pub request_digest: String,
}

/// Why the helper refused. Every message names the reason and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("certificate: {0}")]
    CertEnvelope(EnvelopeError),
    #[error("request: {0}")]
    RequestEnvelope(EnvelopeError),
    #[error("unknown certificate issuer {0}: not a trusted ca key or an accepted node key in imp.toml; get a certificate from the site ca (`canopy cert request`)")]
    UnknownIssuer(String),
    #[error("certificate refused: {0}")]
    CertSignature(EnvelopeError),
    #[error(transparent)]
    Cert(CertError),
    #[error("certificate of kind {kind} signed by key {keyid}, which imp.toml does not trust for that kind; get a certificate from the site ca")]
    IssuerKind { kind: &'static str, keyid: String },
    #[error("certificate names issuer {named} but is signed by {signer}; get a new certificate")]
    IssuerMismatch { named: String, signer: String },
    #[error(
        "certificate not valid yet (not_before {not_before}, now {now}); check the clocks, or wait"
    )]
    CertNotYetValid { not_before: UnixTime, now: UnixTime },
    #[error(
        "certificate expired at {not_after} (now {now}); get a new one with `canopy cert request`"
    )]
    CertExpired { not_after: UnixTime, now: UnixTime },
    #[error("request signed by key {found}, not by the certified key {certified}; sign it with the key of your certificate")]
    WrongUserKey { found: String, certified: String },
    #[error("tampered or forged request: {0}")]
    RequestSignature(EnvelopeError),
    #[error(transparent)]
    Request(RequestError),
    #[error("request is for principal {request} but the certificate is for {cert}; sign it with your own certificate")]
    PrincipalMismatch { request: String, cert: String },
    #[error("wrong audience: the request is for instance {request:?}, this is {this:?}; send it to the instance it names")]
    WrongInstance { request: String, this: String },
    #[error("wrong audience: rank {rank} is not among the request's ranks {ranks:?}; the request was not meant for this rank")]
    RankNotInRequest { rank: u32, ranks: Vec<u32> },
    #[error("wrong audience: the broker says this node is rank {claimed} of {instance:?} but imp.toml's [instances] {}; fix the broker's arguments or imp.toml", match pinned { Some(r) => format!("pins it to rank {r}"), None => "does not list that instance".to_string() })]
    RankPinned {
        instance: String,
        claimed: u32,
        pinned: Option<u32>,
    },
    #[error("wrong audience: the request is for {audience}, but {submitter} submitted it; only the audience the user chose may submit it")]
    WrongSubmitter { audience: String, submitter: String },
    #[error("expired request: not_after {not_after}, now {now}; sign a new request")]
    Expired { not_after: UnixTime, now: UnixTime },
    #[error("request issued in the future (issued_at {issued_at}, now {now}); check the clocks")]
    NotYetIssued { issued_at: UnixTime, now: UnixTime },
    #[error("request lifetime {lifetime} s is longer than the {max} s imp.toml allows; sign it with a shorter expiry")]
    LifetimeTooLong { lifetime: u64, max: u64 },
    #[error(transparent)]
    Replay(ReplayError),
    #[error("target user root is always refused; use an ordinary account")]
    Root,
    #[error(
        "target user {0} has no account on this node; ask the administrator, or use another node"
    )]
    UnknownUser(String),
    #[error("user {0} is not allowed by imp.toml (not in users and in none of groups); ask the administrator to allow it")]
    UserNotAllowed(String),
    #[error("command {0:?} is neither an absolute path nor a bare name; give e.g. \"hostname\" or \"/usr/bin/hostname\"")]
    RelativeCommand(String),
    #[error(
        "command {name:?} not found in the helper's search path {path:?}; give its absolute path"
    )]
    CommandNotFound { name: String, path: Vec<PathBuf> },
    #[error("command {program} is not allowed for {user} by imp.toml; ask the administrator to add it to the allowlist")]
    CommandNotAllowed { program: PathBuf, user: String },
}

fn kind_name(k: CertKind) -> &'static str {
    match k {
        CertKind::Ca => "ca",
        CertKind::NodeAttestation => "node-attestation",
    }
}

/// Run the checks, in order, on the exact bytes the broker passed.
///
/// `resolve(dir, name)` says whether `dir/name` is an executable file (for
/// bare command names, looked up in imp.toml's `search_path`).
#[allow(clippy::too_many_arguments)]
pub fn check(
    roots: &Roots<'_>,
    cert_wire: &[u8],
    request_wire: &[u8],
    target: &Target,
    now: UnixTime,
    cache: &mut dyn ReplayCache,
    accounts: &dyn Accounts,
    resolve: &dyn Fn(&Path) -> bool,
) -> Result<Approved, Refusal> {
    let config = roots.config;

    // 1. Certificate, then the user's signature with the certified key.
    let cenv = Envelope::parse(cert_wire).map_err(Refusal::CertEnvelope)?;
    let from_ca = roots.cas.iter().find(|k| key_id(k) == cenv.keyid());
    let from_node = roots.nodes.iter().find(|k| key_id(k) == cenv.keyid());
    let issuer = from_ca
        .or(from_node)
        .ok_or_else(|| Refusal::UnknownIssuer(cenv.keyid().to_owned()))?;
    let body = cenv
        .verify(USER_CERT_TYPE, issuer, "certificate")
        .map_err(Refusal::CertSignature)?;
    let cert = UserCert::parse(body).map_err(Refusal::Cert)?;
    let trusted_for_kind = match cert.kind {
        CertKind::Ca => from_ca.is_some(),
        CertKind::NodeAttestation => config.node_attestation_keys.is_some() && from_node.is_some(),
    };
    if !trusted_for_kind {
        return Err(Refusal::IssuerKind {
            kind: kind_name(cert.kind),
            keyid: cenv.keyid().to_owned(),
        });
    }
    if cert.issuer != cenv.keyid() {
        return Err(Refusal::IssuerMismatch {
            named: cert.issuer.clone(),
            signer: cenv.keyid().to_owned(),
        });
    }
    if now.saturating_add(CLOCK_SKEW) < cert.not_before {
        return Err(Refusal::CertNotYetValid {
            not_before: cert.not_before,
            now,
        });
    }
    if now >= cert.not_after {
        return Err(Refusal::CertExpired {
            not_after: cert.not_after,
            now,
        });
    }
    let user_key = cert
        .public_key()
        .expect("UserCert::parse checked the public key");
    let renv = Envelope::parse(request_wire).map_err(Refusal::RequestEnvelope)?;
    if renv.keyid() != key_id(&user_key) {
        return Err(Refusal::WrongUserKey {
            found: renv.keyid().to_owned(),
            certified: key_id(&user_key),
        });
    }
    let body = renv
        .verify(EXEC_REQUEST_TYPE, &user_key, "request")
        .map_err(Refusal::RequestSignature)?;
    let request = ExecRequest::parse(body).map_err(Refusal::Request)?;
    if request.principal != cert.principal {
        return Err(Refusal::PrincipalMismatch {
            request: request.principal,
            cert: cert.principal,
        });
    }

    // 2. Audience.
    if request.instance != target.instance {
        return Err(Refusal::WrongInstance {
            request: request.instance,
            this: target.instance.clone(),
        });
    }
    if !config.instances.is_empty() {
        let pinned = config.instances.get(&target.instance).copied();
        if pinned != Some(target.rank) {
            return Err(Refusal::RankPinned {
                instance: target.instance.clone(),
                claimed: target.rank,
                pinned,
            });
        }
    }
    if !request.ranks.contains(&target.rank) {
        return Err(Refusal::RankNotInRequest {
            rank: target.rank,
            ranks: request.ranks,
        });
    }
    let (audience, submitter_ok) = match (&request.audience, &target.submitter) {
        (Audience::User, Submitter::User(p)) => {
            (request.principal.clone(), *p == request.principal)
        }
        (Audience::User, Submitter::Service(_)) => (request.principal.clone(), false),
        (Audience::Service { name }, s) => (
            format!("service:{name}"),
            matches!(s, Submitter::Service(n) if n == name),
        ),
    };
    if !submitter_ok {
        return Err(Refusal::WrongSubmitter {
            audience,
            submitter: target.submitter.to_string(),
        });
    }

    // 3. Expiry.
    if now >= request.not_after {
        return Err(Refusal::Expired {
            not_after: request.not_after,
            now,
        });
    }
    if request.issued_at > now.saturating_add(CLOCK_SKEW) {
        return Err(Refusal::NotYetIssued {
            issued_at: request.issued_at,
            now,
        });
    }
    let lifetime = request.not_after - request.issued_at;
    if lifetime > config.max_request_lifetime {
        return Err(Refusal::LifetimeTooLong {
            lifetime,
            max: config.max_request_lifetime,
        });
    }

    // 4. Nonce.
    let key = replay_key(
        &request.principal,
        &request.nonce,
        &target.instance,
        target.rank,
    );
    cache
        .insert(&key, request.not_after, now)
        .map_err(Refusal::Replay)?;

    // 5. Principal → local user.
    if cert.user == "root" {
        return Err(Refusal::Root);
    }
    let account = accounts
        .user(&cert.user)
        .ok_or_else(|| Refusal::UnknownUser(cert.user.clone()))?;
    if account.uid == 0 || account.gid == 0 || account.groups.contains(&0) {
        return Err(Refusal::Root);
    }
    let by_group = config.groups.iter().any(|g| {
        accounts
            .group_gid(g)
            .is_some_and(|gid| gid != 0 && (account.gid == gid || account.groups.contains(&gid)))
    });
    if !config.users.contains(&cert.user) && !by_group {
        return Err(Refusal::UserNotAllowed(cert.user.clone()));
    }

    // 6. Command.
    let argv0 = &request.argv[0];
    let program = if argv0.starts_with('/') {
        PathBuf::from(argv0)
    } else if argv0.contains('/') || argv0 == "." || argv0 == ".." {
        return Err(Refusal::RelativeCommand(argv0.clone()));
    } else {
        config
            .search_path
            .iter()
            .map(|d| d.join(argv0))
            .find(|p| resolve(p))
            .ok_or_else(|| Refusal::CommandNotFound {
                name: argv0.clone(),
                path: config.search_path.clone(),
            })?
    };
    if let Some(list) = config.allowlist(&cert.user) {
        if !list.contains(&program) {
            return Err(Refusal::CommandNotAllowed {
                program,
                user: cert.user.clone(),
            });
        }
    }

    Ok(Approved {
        request,
        cert,
        account,
        program,
        request_digest: sha256_hex(request_wire),
    })
}
