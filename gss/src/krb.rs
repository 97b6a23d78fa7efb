//! A thin wrapper over `libgssapi` (MIT Kerberos): credentials, contexts
//! with mutual authentication, replay detection and integrity, and MICs.
//!
//! Credentials come from the standard MIT places, passed to the process in
//! its environment: the acceptor's keytab (`KRB5_KTNAME`), the initiator's
//! credential cache (`KRB5CCNAME`) or client keytab (`KRB5_CLIENT_KTNAME`).
//! Nothing here mutates the environment.

use crate::{canonical_principal, GssError};
use libgssapi::context::{ClientCtx, CtxFlags, SecurityContext, ServerCtx};
use libgssapi::credential::{Cred, CredUsage};
use libgssapi::name::Name;
use libgssapi::oid::{OidSet, GSS_MECH_KRB5, GSS_NT_KRB5_PRINCIPAL};
use std::time::Duration;

/// Flags every canopy context asks for and checks.
pub fn required_flags() -> CtxFlags {
    CtxFlags::GSS_C_MUTUAL_FLAG | CtxFlags::GSS_C_REPLAY_FLAG | CtxFlags::GSS_C_INTEG_FLAG
}

fn gss(op: &'static str) -> impl FnOnce(libgssapi::error::Error) -> GssError {
    move |e| GssError::Gss {
        op,
        detail: clean(&e.to_string()),
    }
}

/// One line, no control characters.
pub(crate) fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

fn krb5_mechs() -> Result<OidSet, GssError> {
    let mut s = OidSet::new();
    s.add(GSS_MECH_KRB5)
        .map_err(gss("create a mechanism set"))?;
    Ok(s)
}

/// A Kerberos principal name (krb5 principal name type, `name@REALM` or
/// `service/host@REALM`).
pub fn principal_name(p: &str) -> Result<Name, GssError> {
    canonical_principal(p)?;
    Name::new(p.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL)).map_err(|e| GssError::Name {
        name: p.to_string(),
        reason: clean(&e.to_string()),
    })
}

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// The acceptor keytab this process uses, for messages.
pub fn acceptor_keytab() -> String {
    env_or("KRB5_KTNAME", "FILE:/etc/krb5.keytab (the default)")
}

/// The file a keytab name (`KRB5_KTNAME` syntax) refers to: `FILE:PATH`,
/// `WRFILE:PATH` or a bare absolute or relative path. `None` for keytabs
/// that are not files (`MEMORY:`, `KEYRING:`, ...).
pub fn keytab_file(ktname: &str) -> Option<std::path::PathBuf> {
    let path = match ktname.split_once(':') {
        Some(("FILE" | "WRFILE", p)) => p,
        // A prefix is letters only; anything else is a path with a colon.
        Some((t, _)) if !t.is_empty() && t.chars().all(|c| c.is_ascii_alphabetic()) => return None,
        _ => ktname,
    };
    (!path.is_empty()).then(|| std::path::PathBuf::from(path))
}

/// Refuse a keytab file that is not trusted as a secret for this process's
/// user ([`canopy_security::trust::TrustKind::Secret`]: owned by root or
/// that user, neither readable nor writable by group or other, on a path
/// nobody else can change). Keytabs that are not files pass. Call before
/// handing the keytab to the Kerberos library.
pub fn check_keytab(ktname: &str) -> Result<(), GssError> {
    let Some(path) = keytab_file(ktname) else {
        return Ok(());
    };
    canopy_security::trust::check_trusted(
        &path,
        canopy_security::trust::TrustKind::Secret,
        canopy_security::trust::service_uid(),
    )
    .map(|_| ())
    .map_err(|e| GssError::Credentials(format!("keytab refused: {e}")))
}

/// The initiator's credential sources, for messages.
pub fn initiator_sources() -> String {
    format!(
        "keytab {} or credential cache {}",
        env_or("KRB5_CLIENT_KTNAME", "(default client keytab)"),
        env_or("KRB5CCNAME", "(default)")
    )
}

/// A principal with its realm: `service/host` gets the default realm of
/// the Kerberos configuration; then canonical form.
pub fn qualify(p: &str) -> Result<String, GssError> {
    if p.contains('@') {
        return canonical_principal(p);
    }
    let name = Name::new(p.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL))
        .and_then(|n| n.canonicalize(Some(GSS_MECH_KRB5)))
        .map_err(|e| GssError::Name {
            name: p.to_string(),
            reason: format!(
                "{}; set gssapi.realm or default_realm in krb5.conf",
                clean(&e.to_string())
            ),
        })?;
    canonical_principal(&name.to_string())
}

/// Acceptor credentials for `principal`, from the keytab. Fails at once if
/// the keytab lacks the key or cannot be read.
pub fn acceptor_cred(principal: &str) -> Result<Cred, GssError> {
    let name = principal_name(principal)?;
    let mechs = krb5_mechs()?;
    Cred::acquire(Some(&name), None, CredUsage::Accept, Some(&mechs)).map_err(|e| {
        GssError::Credentials(format!(
            "no Kerberos credentials for {principal} in keytab {}; check KRB5_KTNAME and that the keytab is readable by this user ({})",
            acceptor_keytab(),
            clean(&e.to_string())
        ))
    })
}

/// How long to wait for the KDC when getting a ticket, unless
/// `CANOPY_KDC_TIMEOUT` (seconds) says otherwise.
pub const DEFAULT_KDC_TIMEOUT: Duration = Duration::from_secs(5);

/// The bounded wait for the KDC: `CANOPY_KDC_TIMEOUT` in seconds (0.1 to
/// 300), else [`DEFAULT_KDC_TIMEOUT`]. MIT's own wait for a KDC that
/// accepts connections but never answers is much longer.
pub fn kdc_timeout() -> Duration {
    std::env::var("CANOPY_KDC_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && (0.1..=300.0).contains(s))
        .map_or(DEFAULT_KDC_TIMEOUT, Duration::from_secs_f64)
}

/// Run `f` (which may talk to the KDC) on its own thread, waiting at most
/// `wait`. A hung KDC then costs this caller `wait`, not MIT's timeouts;
/// the thread finishes on its own when the library gives up.
pub fn with_kdc_deadline<T: Send + 'static>(
    wait: Duration,
    what: String,
    f: impl FnOnce() -> Result<T, GssError> + Send + 'static,
) -> Result<T, GssError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("canopy-gss-kdc".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| {
            GssError::Credentials(format!("cannot start a thread to reach the KDC: {e}"))
        })?;
    match rx.recv_timeout(wait) {
        Ok(r) => r,
        Err(_) => Err(GssError::Credentials(format!(
            "cannot get Kerberos credentials for {what}: the KDC did not answer within {:.1}s (it is hung or unreachable); links already up keep working; check the KDC, or set CANOPY_KDC_TIMEOUT (seconds) to wait longer",
            wait.as_secs_f64()
        ))),
    }
}

/// The client keytab this process uses (`KRB5_CLIENT_KTNAME`, else MIT's
/// default), as a file.
fn client_keytab_file() -> Option<std::path::PathBuf> {
    match std::env::var("KRB5_CLIENT_KTNAME") {
        Ok(v) => keytab_file(&v),
        Err(_) => Some(std::path::PathBuf::from(format!(
            "/var/lib/krb5/user/{}/client.keytab",
            nix::unistd::geteuid()
        ))),
    }
}

/// The principal of the first entry of an MIT keytab file (the one the
/// library takes as the default principal of a client keytab). `None` if
/// the file is absent, empty or not a version 2 keytab.
pub fn keytab_first_principal(path: &std::path::Path) -> Option<String> {
    let b = std::fs::read(path).ok()?;
    if b.get(..2)? != [5, 2] {
        return None;
    }
    let mut at = 2;
    let u16_at = |i: usize| Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]) as usize);
    let string_at = |i: usize| -> Option<(String, usize)> {
        let n = u16_at(i)?;
        let s = std::str::from_utf8(b.get(i + 2..i + 2 + n)?).ok()?;
        Some((s.to_string(), i + 2 + n))
    };
    while at + 4 <= b.len() {
        let size = i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if size < 0 {
            // A deleted entry: skip its hole.
            at += size.unsigned_abs() as usize;
            continue;
        }
        if size == 0 {
            return None;
        }
        let comps = u16_at(at)?;
        let (realm, mut i) = string_at(at + 2)?;
        let mut names = Vec::with_capacity(comps);
        for _ in 0..comps {
            let (c, next) = string_at(i)?;
            names.push(c);
            i = next;
        }
        return Some(format!("{}@{realm}", names.join("/")));
    }
    None
}

/// Initiator credentials for `principal` (or the default principal), from
/// the credential cache or the client keytab. Returns the credential and
/// its canonical principal. A KDC that cannot be reached is named as such
/// whichever way the principal was chosen.
pub fn initiator_cred(principal: Option<&str>) -> Result<(Cred, String), GssError> {
    match acquire_initiator(principal) {
        Err(e) if principal.is_none() => {
            // MIT reports only "no credentials" for the default principal
            // when it cannot get a ticket for it from the client keytab;
            // ask again by name to learn why (e.g. the KDC is down).
            let Some(first) = client_keytab_file()
                .as_deref()
                .and_then(keytab_first_principal)
            else {
                return Err(e);
            };
            match acquire_initiator(Some(&first)) {
                Ok(c) => Ok(c),
                Err(GssError::Credentials(m)) if m.contains("the KDC is unreachable") => {
                    Err(GssError::Credentials(m.replacen(
                        &format!("for {first}:"),
                        &format!("for the default principal {first} (of the client keytab):"),
                        1,
                    )))
                }
                Err(_) => Err(e),
            }
        }
        r => r,
    }
}

fn acquire_initiator(principal: Option<&str>) -> Result<(Cred, String), GssError> {
    let name = principal.map(principal_name).transpose()?;
    let mechs = krb5_mechs()?;
    let who = principal.unwrap_or("the default principal");
    let fail = |detail: String| {
        if let Some(i) = detail.find("Cannot contact any KDC") {
            return GssError::Credentials(format!(
                "cannot get Kerberos credentials for {who}: the KDC is unreachable ({}); links already up keep working; check that the KDC runs and that KRB5_CONFIG lists it, then retry",
                detail[i..].trim_end_matches(')')
            ));
        }
        GssError::Credentials(format!(
            "no Kerberos credentials for {who} in {}; check KRB5_CLIENT_KTNAME (keytab) or KRB5CCNAME (run kinit) ({detail})",
            initiator_sources()
        ))
    };
    let cred = Cred::acquire(name.as_ref(), None, CredUsage::Initiate, Some(&mechs))
        .map_err(|e| fail(clean(&e.to_string())))?;
    let display = cred
        .name()
        .map_err(|e| fail(clean(&e.to_string())))?
        .to_string();
    Ok((cred, canonical_principal(&display)?))
}

/// The initiator's context.
pub struct Initiator {
    ctx: ClientCtx,
}

impl Initiator {
    pub fn new(cred: Cred, target: &str) -> Result<Initiator, GssError> {
        let target = principal_name(target)?;
        Ok(Initiator {
            ctx: ClientCtx::new(Some(cred), target, required_flags(), Some(GSS_MECH_KRB5)),
        })
    }

    /// One step; `None` in, the first token out.
    pub fn step(&mut self, tok: Option<&[u8]>) -> Result<Option<Vec<u8>>, GssError> {
        self.ctx
            .step(tok, None)
            .map(|b| b.map(|b| b.to_vec()))
            .map_err(gss("initiate a security context"))
    }

    pub fn is_complete(&self) -> bool {
        self.ctx.is_complete()
    }

    pub fn flags(&self) -> Result<CtxFlags, GssError> {
        self.ctx.flags().map_err(gss("read context flags"))
    }

    /// The ticket's remaining lifetime.
    pub fn lifetime(&self) -> Result<Duration, GssError> {
        self.ctx
            .lifetime()
            .map_err(gss("read the context lifetime"))
    }

    pub fn get_mic(&mut self, msg: &[u8]) -> Result<Vec<u8>, GssError> {
        Ok(self.ctx.get_mic(msg).map_err(gss("make a mic"))?.to_vec())
    }

    pub fn verify_mic(&mut self, msg: &[u8], mic: &[u8]) -> Result<(), GssError> {
        self.ctx
            .verify_mic(msg, mic)
            .map_err(gss("verify the acceptor's mic"))
    }
}

/// The acceptor's context.
pub struct Acceptor {
    ctx: ServerCtx,
}

impl Acceptor {
    pub fn new(cred: Cred) -> Acceptor {
        Acceptor {
            ctx: ServerCtx::new(Some(cred)),
        }
    }

    pub fn step(&mut self, tok: &[u8]) -> Result<Option<Vec<u8>>, GssError> {
        self.ctx
            .step(tok, None)
            .map(|b| b.map(|b| b.to_vec()))
            .map_err(gss("accept a security context"))
    }

    pub fn is_complete(&self) -> bool {
        self.ctx.is_complete()
    }

    pub fn flags(&self) -> Result<CtxFlags, GssError> {
        self.ctx.flags().map_err(gss("read context flags"))
    }

    /// The authenticated initiator, canonical.
    pub fn source(&self) -> Result<String, GssError> {
        let n = self
            .ctx
            .source_name()
            .map_err(gss("read the initiator's name"))?;
        canonical_principal(&n.to_string())
    }

    pub fn lifetime(&self) -> Result<Duration, GssError> {
        self.ctx
            .lifetime()
            .map_err(gss("read the context lifetime"))
    }

    pub fn get_mic(&mut self, msg: &[u8]) -> Result<Vec<u8>, GssError> {
        Ok(self.ctx.get_mic(msg).map_err(gss("make a mic"))?.to_vec())
    }

    pub fn verify_mic(&mut self, msg: &[u8], mic: &[u8]) -> Result<(), GssError> {
        self.ctx
            .verify_mic(msg, mic)
            .map_err(gss("verify the initiator's mic"))
    }
}

/// Check a complete context has every required flag.
pub fn check_flags(flags: CtxFlags) -> Result<(), GssError> {
    let missing = required_flags() - flags;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(GssError::Auth(format!(
            "the kerberos context lacks {missing:?}; canopy requires mutual authentication, replay detection and integrity"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(comps: &[&str], realm: &str) -> Vec<u8> {
        let s = |b: &mut Vec<u8>, t: &str| {
            b.extend_from_slice(&(t.len() as u16).to_be_bytes());
            b.extend_from_slice(t.as_bytes());
        };
        let mut e = (comps.len() as u16).to_be_bytes().to_vec();
        s(&mut e, realm);
        for c in comps {
            s(&mut e, c);
        }
        e.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 18, 0, 2, 0xaa, 0xbb]);
        let mut out = (e.len() as i32).to_be_bytes().to_vec();
        out.extend(e);
        out
    }

    #[test]
    fn the_first_live_entry_of_a_keytab_is_its_default_principal() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kt");
        let mut kt = vec![5, 2];
        // A deleted entry (negative size) is skipped.
        kt.extend_from_slice(&(-6i32).to_be_bytes());
        kt.extend_from_slice(&[0; 6]);
        kt.extend(entry(&["canopy", "N1"], "R.X"));
        kt.extend(entry(&["alice"], "R.X"));
        std::fs::write(&p, &kt).unwrap();
        assert_eq!(keytab_first_principal(&p).as_deref(), Some("canopy/N1@R.X"));
        std::fs::write(&p, [5, 1, 0, 0]).unwrap();
        assert_eq!(keytab_first_principal(&p), None, "version 1 is not read");
        std::fs::write(&p, &kt[..20]).unwrap();
        assert_eq!(keytab_first_principal(&p), None, "truncated");
        assert_eq!(keytab_first_principal(&d.path().join("none")), None);
    }
}
