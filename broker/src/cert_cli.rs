//! `canopy cert request` and `canopy cert show`: the user's certificate
//! for `canopy exec`, kept in `~/.canopy/` (`canopy_imp::userkeys`) and
//! issued by the site CA (`canopy-ca`, docs/imp.md "Site CA").

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use canopy_client::Client;
use canopy_imp::cert::{CertKind, UserCert};
use canopy_imp::envelope::{b64_decode, b64_encode, key_id, Envelope, USER_CERT_TYPE};
use canopy_imp::userkeys::{self, fmt_time, shown};
use canopy_proto::NODEID_ANY;
use clap::Subcommand;
use ed25519_dalek::VerifyingKey;

/// The namespace `canopy-ca` offers.
const CA_NAMESPACE: &str = "ca";

#[derive(Subcommand)]
pub(crate) enum CertCmd {
    /// Ask the site CA (canopy-ca) to certify your exec key: makes
    /// ~/.canopy/exec.key if missing, sends ca.issue, checks the answer
    /// against the key ca.info names and your own key, and saves it as
    /// ~/.canopy/exec.cert.
    Request {
        /// The rank whose broker the CA is a client of (default: the
        /// broker you are connected to). The CA certifies only callers
        /// its own broker authenticated: run this on the CA's host, or
        /// connect to its broker with Kerberos.
        #[arg(long, value_name = "R")]
        ca_rank: Option<u32>,
        /// Lifetime to ask for, in seconds (the CA caps it; default: the
        /// CA's).
        #[arg(long, value_name = "S")]
        lifetime: Option<u64>,
        /// Seconds to wait for each answer.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        #[arg(long)]
        uri: Option<String>,
    },
    /// Print the saved certificate (~/.canopy/exec.cert) and whether it
    /// is valid; exits 1 if it has expired or is not valid yet.
    Show,
}

pub(crate) fn run(cmd: CertCmd) -> Result<i32> {
    match cmd {
        CertCmd::Request {
            ca_rank,
            lifetime,
            timeout,
            uri,
        } => {
            let timeout = Duration::try_from_secs_f64(timeout)
                .context("--timeout must be a non-negative number of seconds")?;
            request(uri.as_deref(), ca_rank, lifetime, timeout, false)
        }
        CertCmd::Show => show(),
    }
}

/// The CA's key, from `ca.info`.
fn ca_key(c: &mut Client, rank: u32, timeout: Duration) -> Result<VerifyingKey> {
    let topic = format!("{CA_NAMESPACE}.info");
    let m = c
        .rpc(&topic, rank, b"", timeout)
        .map_err(|e| anyhow::anyhow!("cannot reach the ca on rank {rank} ({e}); is canopy-ca running there? (canopy service list -r {rank})"))?;
    let bad = || {
        anyhow::anyhow!(
            "rank {rank}'s {topic} answered no ed25519 key; is canopy-ca the provider of {CA_NAMESPACE}?"
        )
    };
    let v: serde_json::Value = serde_json::from_slice(&m.payload).map_err(|_| bad())?;
    let b: [u8; 32] = v["public_key"]
        .as_str()
        .and_then(b64_decode)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    let key = VerifyingKey::from_bytes(&b).map_err(|_| bad())?;
    if v["keyid"].as_str() != Some(key_id(&key).as_str()) {
        return Err(bad());
    }
    Ok(key)
}

/// Check what the CA answered: a `ca` certificate signed by `ca`, for
/// `mine`.
fn check_issued(wire: &[u8], ca: &VerifyingKey, mine: &VerifyingKey) -> Result<UserCert> {
    let env = Envelope::parse(wire).map_err(|e| {
        anyhow::anyhow!("the ca answered something that is not a certificate envelope: {e}")
    })?;
    let body = env
        .verify(USER_CERT_TYPE, ca, "certificate")
        .map_err(|e| anyhow::anyhow!("the certificate the ca answered does not verify with the key ca.info gave: {e}; nothing was saved"))?;
    let cert = UserCert::parse(body)?;
    anyhow::ensure!(
        cert.public_key().as_ref() == Some(mine),
        "the ca certified another key than yours ({}); nothing was saved",
        key_id(mine)
    );
    anyhow::ensure!(
        cert.kind == CertKind::Ca && cert.issuer == key_id(ca),
        "the ca answered a {:?} certificate issued by {}, not a ca certificate issued by its own key; nothing was saved",
        cert.kind,
        cert.issuer
    );
    Ok(cert)
}

/// `canopy cert request`; `quiet` (the automatic request of `canopy
/// exec`): one line on stderr instead of the report on stdout.
pub(crate) fn request(
    uri: Option<&str>,
    ca_rank: Option<u32>,
    lifetime: Option<u64>,
    timeout: Duration,
    quiet: bool,
) -> Result<i32> {
    let dir = userkeys::default_dir()?;
    let key = userkeys::load_or_create_key(&dir)?;
    let mine = key.verifying_key();
    let mut c = Client::connect(uri)?;
    let rank = match ca_rank {
        Some(r) => r,
        // The broker we are connected to answers with its own rank.
        None => {
            c.rpc("broker.ping", NODEID_ANY, b"", timeout)
                .map_err(|e| anyhow::anyhow!("cannot reach the broker: {e}"))?
                .header
                .nodeid
        }
    };
    let ca = ca_key(&mut c, rank, timeout)?;
    let mut body = serde_json::json!({ "public_key": b64_encode(mine.as_bytes()) });
    if let Some(s) = lifetime {
        body["lifetime_s"] = s.into();
    }
    let m = c
        .rpc(
            &format!("{CA_NAMESPACE}.issue"),
            rank,
            body.to_string().as_bytes(),
            timeout,
        )
        .map_err(|e| anyhow::anyhow!("the ca did not issue a certificate: {e}"))?;
    let cert = check_issued(&m.payload, &ca, &mine)?;
    let path = userkeys::save_cert(&dir, &m.payload)?;
    if quiet {
        eprintln!(
            "canopy exec: certified by the site ca on rank {rank} as {} (user {}) until {}; saved {}",
            cert.principal,
            cert.user,
            fmt_time(cert.not_after),
            shown(&path)
        );
        return Ok(0);
    }
    outln!("principal: {}", cert.principal);
    outln!("user:      {}", cert.user);
    outln!(
        "not_after: {} ({} s from now)",
        fmt_time(cert.not_after),
        cert.not_after.saturating_sub(userkeys::now())
    );
    outln!("ca:        {} (rank {rank})", key_id(&ca));
    outln!("saved:     {}", shown(&path));
    Ok(0)
}

fn show() -> Result<i32> {
    let dir = userkeys::default_dir()?;
    let (_, cert) = userkeys::read_cert(&dir)?;
    let now = userkeys::now();
    let key = cert
        .public_key()
        .map(|k| key_id(&k))
        .unwrap_or_else(|| "(invalid)".into());
    outln!("file:       {}", shown(&dir.join(userkeys::CERT_FILE)));
    outln!("kind:       {}", kind_name(cert.kind));
    outln!("principal:  {}", cert.principal);
    outln!("user:       {}", cert.user);
    outln!("key:        {key}{}", key_note(&dir, &cert));
    outln!("issuer:     {}", cert.issuer);
    outln!("not_before: {}", fmt_time(cert.not_before));
    outln!("not_after:  {}", fmt_time(cert.not_after));
    let (status, code) = if now >= cert.not_after {
        (
            format!(
                "EXPIRED ({} s ago); run canopy cert request",
                now - cert.not_after
            ),
            1,
        )
    } else if now.saturating_add(userkeys::SKEW) < cert.not_before {
        (
            "NOT YET VALID; check this host's clock, or run canopy cert request".to_string(),
            1,
        )
    } else {
        (format!("valid ({} s left)", cert.not_after - now), 0)
    };
    outln!("status:     {status}");
    Ok(code)
}

fn kind_name(k: CertKind) -> &'static str {
    match k {
        CertKind::Ca => "ca",
        CertKind::NodeAttestation => "node-attestation",
    }
}

/// Whether the certificate is for the key in `dir`.
fn key_note(dir: &Path, cert: &UserCert) -> String {
    match userkeys::read_key(&dir.join(userkeys::KEY_FILE)) {
        Ok(k) if cert.public_key() == Some(k.verifying_key()) => {
            format!(" (your {})", userkeys::KEY_FILE)
        }
        Ok(_) => format!(
            " (NOT your {}; run canopy cert request)",
            userkeys::KEY_FILE
        ),
        Err(e) => format!(" ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    #[test]
    fn only_a_ca_certificate_for_our_key_from_the_ca_key_is_accepted() {
        let ca = SigningKey::from_bytes(&[1; 32]);
        let me = SigningKey::from_bytes(&[2; 32]);
        let other = SigningKey::from_bytes(&[3; 32]);
        let issue = |kind, subject: &SigningKey, by: &SigningKey| {
            UserCert::issue(
                kind,
                "unix:alice",
                "alice",
                &subject.verifying_key(),
                1,
                2,
                by,
            )
            .1
        };
        let (cav, mev) = (ca.verifying_key(), me.verifying_key());
        let ok = check_issued(&issue(CertKind::Ca, &me, &ca), &cav, &mev).unwrap();
        assert_eq!(ok.user, "alice");
        let e = check_issued(&issue(CertKind::Ca, &other, &ca), &cav, &mev).unwrap_err();
        assert!(e.to_string().contains("another key than yours"), "{e:#}");
        let e = check_issued(&issue(CertKind::Ca, &me, &other), &cav, &mev).unwrap_err();
        assert!(format!("{e:#}").contains("does not verify"), "{e:#}");
        let e = check_issued(&issue(CertKind::NodeAttestation, &me, &ca), &cav, &mev).unwrap_err();
        assert!(e.to_string().contains("not a ca certificate"), "{e:#}");
        assert!(check_issued(b"nope", &cav, &mev).is_err());
    }
}
