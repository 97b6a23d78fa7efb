//! Canopy's per-principal access control: the policy engine behind the ZAP
//! handler and the local connector.
//!
//! * [`Acl::load`] / [`Acl::parse`] read a TOML policy and refuse bad input
//!   with `file:line:col` and what to do about it;
//! * [`Acl::decide`] answers a [`Query`] with a [`Verdict`] (pure, except
//!   for delegate rules, which go through a [`Delegator`]);
//! * [`AclPolicy`] puts an `Acl` behind [`canopy_zap::Policy`] with atomic
//!   reload;
//! * [`audit`] keeps a hash-chained JSON-lines log of every decision.
//!
//! # Principals and their canonical form
//!
//! | form | example | canonicalization |
//! |---|---|---|
//! | Kerberos user | `alice@HPC.EXAMPLE` | none: name and realm are case-sensitive |
//! | Kerberos service | `canopy/node1.hpc.example@HPC.EXAMPLE` | none: service, host and realm are case-sensitive, exactly as the KDC authenticated them |
//! | CURVE key | `curve:rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7` | none: Z85 is case-sensitive; must decode to 32 bytes |
//! | local user | `unix:alice` | none: user names are case-sensitive |
//!
//! Decisions, made deliberately:
//!
//! * **The instance is kept.** `host/x@R` stays `host/x@R`; unlike
//!   HTCondor's default map it never becomes `host@R`, so a host key cannot
//!   pass for a user of the same name.
//! * **Realms are compared exactly**, case included: MIT realms are
//!   case-sensitive, and `HPC.EXAMPLE` and `hpc.example` are different
//!   realms. No realm is implied: a Kerberos principal must carry `@REALM`.
//! * **Names are case-sensitive** (`Alice@R` is not `alice@R`), as Kerberos
//!   compares them.
//! * **Host parts are case-sensitive too.** A principal is compared exactly
//!   as the KDC authenticated it: `svc/NODE1@R` and `svc/node1@R` are two
//!   principals with two keys in the KDC, and a rule for one never grants
//!   the other (folding the host once let a keytab for `canopy/N1@R` join
//!   as `canopy/n1@R`'s rank). Write host parts as the KDC spells them
//!   (usually lower case). No trailing-dot or DNS canonicalization is done.
//! * **Refused**: empty parts, more than one `@`, more than two components
//!   (`a/b/c@R`), control characters, whitespace, `\` (escapes are not
//!   supported), `:` and `*` in Kerberos names (so no GSSAPI name can look
//!   like `curve:...`, `unix:...` or a pattern), and anything over 1024
//!   bytes.
//! * **Kinds are tied to mechanisms**: a `curve:` principal only with
//!   CURVE, `unix:` only with the local connector, a Kerberos name only with
//!   GSSAPI. Anything else is denied before the rules are consulted.
//! * The prefix decides the form: `curve:` and `unix:` are recognized first,
//!   because Z85 keys may contain `@` and `/`.
//!
//! # The policy file
//!
//! ```toml
//! # Named groups of principals (usually CURVE keys); the value is a label.
//! [keys.ops]
//! "curve:rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7" = "alice-laptop"
//!
//! [[rule]]
//! name = "brokers"                     # required, unique
//! principal = "canopy/*@HPC.EXAMPLE"   # see patterns below
//! mechanism = "gssapi"                 # optional: curve | gssapi | local
//! network = ["10.0.0.0/8", "fd00::/8"] # optional; any address if absent
//! expires = 2027-01-01T00:00:00Z       # optional; ignored from then on
//! roles = ["peer"]                     # exactly one of roles, deny, delegate
//!
//! [[rule]]
//! name = "ldap-users"
//! principal = "*@HPC.EXAMPLE"
//! delegate = { program = "/usr/libexec/canopy-ldap-check", timeout_ms = 500, roles = ["user"] }
//!
//! [[rule]]
//! name = "stolen-laptop"
//! principal = "curve:rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
//! deny = true
//! ```
//!
//! Top-level keys are `keys` and `rule` only; a rule takes `name`,
//! `principal`, `comment`, `mechanism`, `network`, `expires`, and one of
//! `roles`, `deny = true` or `delegate` (`program`, `args`, `timeout_ms`
//! 1–10000, default 1000, `roles`). Unknown keys are errors.
//!
//! Principal patterns: an exact principal (canonicalized as above); `*`
//! (anyone); `curve:*`; `unix:*`; `keys:GROUP`; and Kerberos patterns where
//! `*` stands for one whole component: `*@REALM` (one-component names of
//! the realm, so *not* service principals), `service/*@REALM`,
//! `*/host@REALM`, `*/*@REALM`. The realm is never a wildcard.
//!
//! `network` takes CIDRs (`10.0.0.0/8`, `fd00::/8`) or single addresses;
//! host bits must be zero. IPv4-mapped IPv6 addresses are matched as IPv4.
//! A query without an address never matches a rule with `network`.
//!
//! `expires` must be an offset date-time; the rule is ignored at and after
//! that instant.
//!
//! # Semantics
//!
//! Every rule is evaluated. Any matching deny rule denies (deny beats
//! allow); otherwise the roles of all matching allow rules, plus those of
//! delegate rules that answered yes, are united; no roles means deny (the
//! default). The verdict names the deciding rule: the deny rule, or the
//! first granting rule in file order (all of them in
//! [`Verdict::matched`]).
//!
//! Delegate rules are allow-only: a program that says no, fails, or times
//! out grants nothing (fail closed) but does not veto other rules. The
//! rule's `roles` are both what a plain yes grants and the most the program
//! may grant; see [`ProcessDelegator`] for the protocol. A delegate blocks
//! the ZAP handler while it runs, hence the short timeouts.
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

pub mod audit;
pub mod cidr;
mod decide;
mod delegate;
pub mod fuzz;
mod policy;
pub mod principal;
mod time;
mod zap;

pub use audit::{verify, AuditError, AuditEvent, AuditKind, AuditLog, VerifyError};
pub use cidr::{parse_address, Cidr, CidrError};
pub use decide::{DelegateReply, DelegateRequest, Delegator, NoDelegates, Query, RuleRef, Verdict};
pub use delegate::{parse_reply, run_delegate, ProcessDelegator, MAX_DELEGATE_OUTPUT};
pub use policy::{Acl, AclError, Action, DelegateSpec, Rule, MAX_POLICY_BYTES};
pub use principal::{Pattern, Principal, PrincipalError};
pub use time::rfc3339;

/// How a principal authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mech {
    /// CURVE over TCP (a `curve:` principal).
    Curve,
    /// Kerberos through GSSAPI (a `name@REALM` principal).
    Gssapi,
    /// The local UNIX socket, uid from `SO_PEERCRED` (a `unix:` principal).
    Local,
}

impl Mech {
    /// The name used in policy files and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Mech::Curve => "curve",
            Mech::Gssapi => "gssapi",
            Mech::Local => "local",
        }
    }
}

impl fmt::Display for Mech {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Unknown mechanism name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mechanism {0:?}; use curve, gssapi or local")]
pub struct MechParseError(pub String);

impl FromStr for Mech {
    type Err = MechParseError;
    fn from_str(s: &str) -> Result<Mech, MechParseError> {
        match s {
            "curve" => Ok(Mech::Curve),
            "gssapi" => Ok(Mech::Gssapi),
            "local" => Ok(Mech::Local),
            _ => Err(MechParseError(s.to_owned())),
        }
    }
}

pub use zap::AclPolicy;

/// The CURVE principal of synthetic key number `i` (deterministic).
pub fn synthetic_key(i: usize) -> String {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut key = [0u8; 32];
    for chunk in key.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    canopy_security::curve_principal(&key)
}

/// A principal and mechanism that rule `i` of [`synthetic_policy`] is
/// about, for benchmarks.
pub fn synthetic_principal(i: usize) -> (String, Mech) {
    match i % 10 {
        0..=5 => (synthetic_key(i), Mech::Curve),
        6 => (format!("user{i}@HPC.EXAMPLE"), Mech::Gssapi),
        7 => (
            format!("svc{i}/node{i}.hpc.example@HPC.EXAMPLE"),
            Mech::Gssapi,
        ),
        8 => (synthetic_key(1_000_000 + i % 16), Mech::Curve),
        _ => (format!("unix:user{i}"), Mech::Local),
    }
}

/// A valid policy of `n` rules mixing every feature (exact CURVE keys,
/// Kerberos names and patterns, key groups, networks, expiry, deny rules;
/// no delegates), for the lead's benchmark. Rule `i` is named `r{i}`;
/// [`synthetic_principal`] gives a principal it matches.
pub fn synthetic_policy(n: usize) -> String {
    use fmt::Write;
    let mut s = String::from("# synthetic policy for benchmarks\n[keys.synth]\n");
    for k in 0..16 {
        let _ = writeln!(
            s,
            "\"{}\" = \"synthetic-{k}\"",
            synthetic_key(1_000_000 + k)
        );
    }
    for i in 0..n {
        let _ = writeln!(s, "\n[[rule]]\nname = \"r{i}\"");
        let _ = match i % 10 {
            0 => writeln!(
                s,
                "principal = \"{}\"\nmechanism = \"curve\"\ndeny = true",
                synthetic_key(i)
            ),
            1..=4 => writeln!(s, "principal = \"{}\"\nroles = [\"user\"]", synthetic_key(i)),
            5 => writeln!(
                s,
                "principal = \"{}\"\nnetwork = [\"10.{}.0.0/16\", \"fd00:{:x}::/32\"]\nroles = [\"operator\"]",
                synthetic_key(i),
                i % 256,
                i % 65536
            ),
            6 => writeln!(s, "principal = \"user{i}@HPC.EXAMPLE\"\nroles = [\"user\"]"),
            7 => writeln!(
                s,
                "principal = \"svc{i}/*@HPC.EXAMPLE\"\nmechanism = \"gssapi\"\nroles = [\"peer\"]"
            ),
            8 => writeln!(
                s,
                "principal = \"keys:synth\"\nexpires = 2099-01-01T00:00:00Z\nroles = [\"admin\"]"
            ),
            _ => writeln!(
                s,
                "principal = \"unix:user{i}\"\nmechanism = \"local\"\nroles = [\"user\"]"
            ),
        };
    }
    s
}
