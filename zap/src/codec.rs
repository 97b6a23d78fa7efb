//! ZAP (RFC 27) request and reply codec, plus Z85 (RFC 32). Pure: no I/O.
//!
//! # What arrives on the handler's REP socket
//!
//! On the wire libzmq sends `""`, `"1.0"`, request-id, domain, address,
//! identity, mechanism, credentials... The REP socket strips the envelope
//! (everything up to and including the empty delimiter), so with libzmq
//! 4.3.4 a REP socket receives, for a CURVE client:
//!
//! ```text
//! ["1.0", "1", <domain>, "127.0.0.1", <routing id, usually "">, "CURVE", <32-byte client public key>]
//! ```
//!
//! (checked by the `rep_socket_receives_frames_from_version_on` test).
//! [`parse_request`] accepts that form and also the raw form that still
//! carries the leading empty delimiter (as a ROUTER- or DEALER-based handler
//! would see it). The two cannot be confused: the version frame is never
//! empty.
//!
//! [`ZapReply::encode`] produces the REP form, `"1.0"` first; the REP socket
//! adds the envelope back.

use std::fmt;

use crate::ZapError;

/// The only ZAP version there is.
pub const ZAP_VERSION: &[u8] = b"1.0";
/// Length of a CURVE public key, in bytes.
pub const CURVE_KEY_LEN: usize = 32;
/// Prefix of the canonical principal of a CURVE peer.
pub const CURVE_PREFIX: &str = "curve:";
/// Metadata name under which the handler publishes a peer's roles.
pub const ROLES_PROPERTY: &str = "Roles";
/// Metadata property carrying roles scoped to topics and the namespaces a
/// client may register (`canopy_proto::Grant::encode_scope`); absent when
/// there are none.
pub const SCOPE_PROPERTY: &str = "Scope";
/// Metadata property holding an admitted CURVE peer's principal
/// (`curve:<Z85>`), whatever `User-Id` the policy chose.
pub const LINK_KEY_PROPERTY: &str = "Link-Key";

/// Status codes of RFC 27.
pub const STATUS_OK: u16 = 200;
pub const STATUS_TEMPORARY: u16 = 300;
pub const STATUS_DENIED: u16 = 400;
pub const STATUS_ERROR: u16 = 500;

/// The security mechanism a peer used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mechanism {
    Null,
    Plain,
    Curve,
    Gssapi,
}

impl Mechanism {
    /// The name as it appears in a ZAP request.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Null => "NULL",
            Mechanism::Plain => "PLAIN",
            Mechanism::Curve => "CURVE",
            Mechanism::Gssapi => "GSSAPI",
        }
    }

    fn from_frame(frame: &[u8]) -> Option<Mechanism> {
        match frame {
            b"NULL" => Some(Mechanism::Null),
            b"PLAIN" => Some(Mechanism::Plain),
            b"CURVE" => Some(Mechanism::Curve),
            b"GSSAPI" => Some(Mechanism::Gssapi),
            _ => None,
        }
    }
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed, validated ZAP request.
///
/// Validation guarantees: CURVE carries exactly one 32-byte key; GSSAPI
/// exactly one non-empty UTF-8 principal without control characters, at most
/// [`canopy_proto::MAX_USERID`] bytes; PLAIN exactly two frames; NULL none.
/// So [`ZapRequest::principal`] cannot fail for a request that parsed.
#[derive(Clone, PartialEq, Eq)]
pub struct ZapRequest {
    pub version: String,
    pub request_id: Vec<u8>,
    pub domain: String,
    pub address: String,
    pub identity: Vec<u8>,
    pub mechanism: Mechanism,
    pub credentials: Vec<Vec<u8>>,
}

// Hand-written so that a PLAIN password never reaches a log through `{:?}`.
impl fmt::Debug for ZapRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZapRequest")
            .field("version", &self.version)
            .field("request_id", &self.request_id)
            .field("domain", &self.domain)
            .field("address", &self.address)
            .field("identity", &self.identity)
            .field("mechanism", &self.mechanism)
            .field("principal", &self.principal())
            .field(
                "credentials",
                &format_args!("<{} frames>", self.credentials.len()),
            )
            .finish()
    }
}

impl ZapRequest {
    /// The canonical principal of the peer: `curve:<Z85 of the public key>`
    /// for CURVE, the principal's display name for GSSAPI, and `None` for
    /// NULL and PLAIN (Canopy does not accept passwords).
    pub fn principal(&self) -> Option<String> {
        match self.mechanism {
            Mechanism::Curve => self.credentials.first().and_then(|k| curve_principal(k)),
            Mechanism::Gssapi => self
                .credentials
                .first()
                .and_then(|p| std::str::from_utf8(p).ok())
                .map(str::to_owned),
            Mechanism::Null | Mechanism::Plain => None,
        }
    }
}

/// The canonical principal of a CURVE public key: `curve:<40 Z85 chars>`.
/// `None` unless `key` is exactly 32 bytes.
pub fn curve_principal(key: &[u8]) -> Option<String> {
    if key.len() != CURVE_KEY_LEN {
        return None;
    }
    let key: &[u8; 32] = key.try_into().ok()?;
    Some(canopy_security::curve_principal(key))
}

fn bad(status_code: u16, request_id: Option<&Vec<u8>>, reason: impl Into<String>) -> ZapError {
    ZapError::BadRequest {
        status_code,
        request_id: request_id.cloned(),
        reason: reason.into(),
    }
}

fn utf8_field(frame: &[u8], what: &str, request_id: &Vec<u8>) -> Result<String, ZapError> {
    String::from_utf8(frame.to_vec()).map_err(|_| {
        bad(
            STATUS_ERROR,
            Some(request_id),
            format!("{what} is not utf-8"),
        )
    })
}

/// Parse and validate a ZAP request as received on a REP socket (or with
/// the leading empty delimiter still present).
///
/// Errors are always [`ZapError::BadRequest`], carrying the status to reply
/// with (400 for a wrong version, 500 otherwise) and the request id when one
/// could be extracted. Never panics, whatever the input.
pub fn parse_request(frames: &[Vec<u8>]) -> Result<ZapRequest, ZapError> {
    let frames = match frames.first() {
        Some(first) if first.is_empty() => &frames[1..],
        _ => frames,
    };
    let Some(version) = frames.first() else {
        return Err(bad(STATUS_ERROR, None, "no frames after the delimiter"));
    };
    let request_id = frames.get(1);
    if version.as_slice() != ZAP_VERSION {
        return Err(bad(
            STATUS_DENIED,
            request_id,
            format!(
                "unsupported version {:?}, expected \"1.0\"",
                String::from_utf8_lossy(version)
            ),
        ));
    }
    let Some(request_id) = request_id else {
        return Err(bad(STATUS_ERROR, None, "missing request id"));
    };
    if frames.len() < 6 {
        return Err(bad(
            STATUS_ERROR,
            Some(request_id),
            format!("only {} of at least 6 frames", frames.len()),
        ));
    }
    let domain = utf8_field(&frames[2], "domain", request_id)?;
    let address = utf8_field(&frames[3], "address", request_id)?;
    let identity = frames[4].clone();
    let mechanism = Mechanism::from_frame(&frames[5]).ok_or_else(|| {
        bad(
            STATUS_ERROR,
            Some(request_id),
            format!(
                "unknown mechanism {:?}",
                String::from_utf8_lossy(&frames[5])
            ),
        )
    })?;
    let credentials = &frames[6..];
    let expected = match mechanism {
        Mechanism::Null => 0,
        Mechanism::Plain => 2,
        Mechanism::Curve | Mechanism::Gssapi => 1,
    };
    if credentials.len() != expected {
        return Err(bad(
            STATUS_ERROR,
            Some(request_id),
            format!(
                "{mechanism} needs {expected} credential frame(s), got {}",
                credentials.len()
            ),
        ));
    }
    match mechanism {
        Mechanism::Curve if credentials[0].len() != CURVE_KEY_LEN => {
            return Err(bad(
                STATUS_ERROR,
                Some(request_id),
                format!("curve key is {} bytes, expected 32", credentials[0].len()),
            ));
        }
        Mechanism::Gssapi => {
            let p = &credentials[0];
            let ok = !p.is_empty()
                && p.len() <= canopy_proto::MAX_USERID
                && std::str::from_utf8(p).is_ok_and(|s| !s.chars().any(char::is_control));
            if !ok {
                return Err(bad(
                    STATUS_ERROR,
                    Some(request_id),
                    "gssapi principal is empty, too long, not utf-8 or has control characters",
                ));
            }
        }
        _ => {}
    }
    Ok(ZapRequest {
        version: "1.0".to_owned(),
        request_id: request_id.clone(),
        domain,
        address,
        identity,
        mechanism,
        credentials: credentials.to_vec(),
    })
}

/// A ZAP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZapReply {
    pub request_id: Vec<u8>,
    pub status_code: u16,
    pub status_text: String,
    pub user_id: String,
    pub metadata: Vec<(String, Vec<u8>)>,
}

impl ZapReply {
    /// A 200 reply admitting `user_id`.
    pub fn allow(
        request_id: Vec<u8>,
        user_id: String,
        metadata: Vec<(String, Vec<u8>)>,
    ) -> ZapReply {
        ZapReply {
            request_id,
            status_code: STATUS_OK,
            status_text: "OK".to_owned(),
            user_id,
            metadata,
        }
    }

    /// A 400 reply (authentication failed).
    pub fn deny(request_id: Vec<u8>, status_text: impl Into<String>) -> ZapReply {
        Self::failure(request_id, STATUS_DENIED, status_text)
    }

    /// A 500 reply (internal error or malformed request).
    pub fn error(request_id: Vec<u8>, status_text: impl Into<String>) -> ZapReply {
        Self::failure(request_id, STATUS_ERROR, status_text)
    }

    fn failure(request_id: Vec<u8>, status_code: u16, text: impl Into<String>) -> ZapReply {
        ZapReply {
            request_id,
            status_code,
            status_text: text.into(),
            user_id: String::new(),
            metadata: Vec::new(),
        }
    }

    /// Encode for sending on a REP socket: `"1.0"`, request id, status
    /// code, status text, user id, metadata (6 frames). The REP socket adds
    /// the envelope and empty delimiter itself.
    ///
    /// Fails closed: if the metadata cannot be encoded, this encodes a 500
    /// with no user id instead of admitting the peer without it.
    pub fn encode(&self) -> Vec<Vec<u8>> {
        let (code, text, user_id, metadata) = match encode_metadata(&self.metadata) {
            Ok(m) => (
                self.status_code,
                self.status_text.as_str(),
                self.user_id.as_str(),
                m,
            ),
            Err(_) => (STATUS_ERROR, "invalid metadata", "", Vec::new()),
        };
        vec![
            ZAP_VERSION.to_vec(),
            self.request_id.clone(),
            code.to_string().into_bytes(),
            text.as_bytes().to_vec(),
            user_id.as_bytes().to_vec(),
            metadata,
        ]
    }
}

fn valid_property_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'))
}

/// Encode ZMTP metadata: per entry a 1-byte name length, the name, a 4-byte
/// big-endian value length, the value. Names must be 1-255 characters from
/// `[A-Za-z0-9-_.+]`.
pub fn encode_metadata(entries: &[(String, Vec<u8>)]) -> Result<Vec<u8>, ZapError> {
    let mut out = Vec::new();
    for (name, value) in entries {
        if !valid_property_name(name) {
            return Err(ZapError::Metadata(format!("bad property name {name:?}")));
        }
        let vlen = u32::try_from(value.len())
            .map_err(|_| ZapError::Metadata(format!("value of {name} is too long")))?;
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&vlen.to_be_bytes());
        out.extend_from_slice(value);
    }
    Ok(out)
}

/// Decode metadata written by [`encode_metadata`]. Rejects truncated input
/// and bad names; never panics.
pub fn decode_metadata(mut bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, ZapError> {
    let truncated = || ZapError::Metadata("truncated entry".to_owned());
    let mut out = Vec::new();
    while let Some((&nlen, rest)) = bytes.split_first() {
        let nlen = usize::from(nlen);
        if rest.len() < nlen + 4 {
            return Err(truncated());
        }
        let (name, rest) = rest.split_at(nlen);
        let name = std::str::from_utf8(name)
            .ok()
            .filter(|n| valid_property_name(n))
            .ok_or_else(|| ZapError::Metadata("bad property name".to_owned()))?;
        let (vlen, rest) = rest.split_at(4);
        let vlen = u32::from_be_bytes([vlen[0], vlen[1], vlen[2], vlen[3]]);
        let vlen = usize::try_from(vlen).map_err(|_| truncated())?;
        if rest.len() < vlen {
            return Err(truncated());
        }
        let (value, rest) = rest.split_at(vlen);
        out.push((name.to_owned(), value.to_vec()));
        bytes = rest;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    fn curve_frames(key: &[u8]) -> Vec<Vec<u8>> {
        vec![
            f("1.0"),
            f("1"),
            f("canopy"),
            f("127.0.0.1"),
            Vec::new(),
            f("CURVE"),
            key.to_vec(),
        ]
    }

    fn status(r: Result<ZapRequest, ZapError>) -> (u16, Option<Vec<u8>>) {
        match r {
            Err(ZapError::BadRequest {
                status_code,
                request_id,
                ..
            }) => (status_code, request_id),
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn parses_curve_request_with_and_without_delimiter() {
        let key = [7u8; 32];
        let req = parse_request(&curve_frames(&key)).unwrap();
        assert_eq!(req.mechanism, Mechanism::Curve);
        assert_eq!(req.address, "127.0.0.1");
        assert_eq!(req.domain, "canopy");
        assert_eq!(req.request_id, b"1");
        assert_eq!(
            req.principal().unwrap(),
            format!("curve:{}", zmq::z85_encode(&key).unwrap())
        );
        let mut with_delim = vec![Vec::new()];
        with_delim.extend(curve_frames(&key));
        assert_eq!(parse_request(&with_delim).unwrap(), req);
    }

    #[test]
    fn parses_null_gssapi_plain() {
        let base = |mech: &str| vec![f("1.0"), f("7"), f(""), f("10.0.0.1"), f("id"), f(mech)];
        let null = parse_request(&base("NULL")).unwrap();
        assert_eq!(null.principal(), None);
        let mut g = base("GSSAPI");
        g.push(f("alice@TEST.REALM"));
        let g = parse_request(&g).unwrap();
        assert_eq!(g.principal().as_deref(), Some("alice@TEST.REALM"));
        let mut p = base("PLAIN");
        p.push(f("bob"));
        p.push(f("hunter2"));
        let p = parse_request(&p).unwrap();
        assert_eq!(p.principal(), None);
        assert!(
            !format!("{p:?}").contains("hunter2"),
            "debug must not show passwords"
        );
    }

    #[test]
    fn malformed_requests_get_the_right_status() {
        let key = [1u8; 32];
        let good = curve_frames(&key);
        // Nothing at all, or only a delimiter: 500 and no request id.
        assert_eq!(status(parse_request(&[])), (500, None));
        assert_eq!(status(parse_request(&[Vec::new()])), (500, None));
        // Wrong version: 400, with the request id when present.
        let mut v = good.clone();
        v[0] = f("2.0");
        assert_eq!(status(parse_request(&v)), (400, Some(f("1"))));
        assert_eq!(status(parse_request(&[f("0.9")])), (400, None));
        // Version only.
        assert_eq!(status(parse_request(&[f("1.0")])), (500, None));
        // Missing frames: every truncation of a good request fails.
        for n in 2..good.len() {
            assert_eq!(
                status(parse_request(&good[..n])),
                (500, Some(f("1"))),
                "n={n}"
            );
        }
        // Extra credential frame.
        let mut extra = good.clone();
        extra.push(f("x"));
        assert_eq!(status(parse_request(&extra)), (500, Some(f("1"))));
        // Wrong key lengths.
        for len in [0, 31, 33, 64] {
            let r = parse_request(&curve_frames(&vec![9u8; len]));
            assert_eq!(status(r), (500, Some(f("1"))), "len={len}");
        }
        // Unknown mechanism.
        let mut m = good.clone();
        m[5] = f("KERBEROS");
        assert_eq!(status(parse_request(&m)), (500, Some(f("1"))));
        // NULL with credentials, PLAIN with one frame, GSSAPI without principal.
        let mut n = good.clone();
        n[5] = f("NULL");
        assert_eq!(status(parse_request(&n)), (500, Some(f("1"))));
        let mut p = good.clone();
        p[5] = f("PLAIN");
        assert_eq!(status(parse_request(&p)), (500, Some(f("1"))));
        let mut g = good[..6].to_vec();
        g[5] = f("GSSAPI");
        assert_eq!(status(parse_request(&g)), (500, Some(f("1"))));
        for bad_principal in [f(""), vec![0xff, 0xfe], f("a\nb@R"), vec![b'a'; 5000]] {
            let mut g = good[..6].to_vec();
            g[5] = f("GSSAPI");
            g.push(bad_principal);
            assert_eq!(status(parse_request(&g)), (500, Some(f("1"))));
        }
        // Non-utf-8 address.
        let mut a = good.clone();
        a[3] = vec![0xc3, 0x28];
        assert_eq!(status(parse_request(&a)), (500, Some(f("1"))));
    }

    #[test]
    fn random_garbage_never_panics() {
        // Deterministic xorshift so the test is reproducible without a rand dependency.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let pieces: [&[u8]; 8] = [
            b"",
            b"1.0",
            b"1",
            b"CURVE",
            b"NULL",
            b"GSSAPI",
            b"PLAIN",
            &[0xff],
        ];
        for _ in 0..20_000 {
            let n = (next() % 10) as usize;
            let frames: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    let r = next();
                    if r % 3 == 0 {
                        let len = (r >> 8) as usize % 40;
                        (0..len).map(|_| next() as u8).collect()
                    } else {
                        pieces[(r >> 8) as usize % pieces.len()].to_vec()
                    }
                })
                .collect();
            match parse_request(&frames) {
                Ok(req) => {
                    let _ = req.principal();
                }
                Err(ZapError::BadRequest { status_code, .. }) => {
                    assert!(status_code == 400 || status_code == 500)
                }
                Err(e) => panic!("unexpected error kind {e}"),
            }
            let blob: Vec<u8> = frames.concat();
            let _ = decode_metadata(&blob);
        }
    }

    #[test]
    fn metadata_roundtrip_and_rejects_garbage() {
        let entries = vec![
            ("Roles".to_owned(), b"peer,user".to_vec()),
            ("X-Empty".to_owned(), Vec::new()),
        ];
        let bytes = encode_metadata(&entries).unwrap();
        assert_eq!(&bytes[..6], b"\x05Roles");
        assert_eq!(&bytes[6..10], &[0, 0, 0, 9]);
        assert_eq!(decode_metadata(&bytes).unwrap(), entries);
        assert_eq!(decode_metadata(&[]).unwrap(), vec![]);
        for cut in 1..bytes.len() {
            if cut == 1 + 5 + 4 + 9 {
                continue; // exactly the end of the first entry
            }
            assert!(decode_metadata(&bytes[..cut]).is_err(), "cut={cut}");
        }
        assert!(decode_metadata(&[5, b'a', b'b']).is_err());
        assert!(decode_metadata(&[1, b' ', 0, 0, 0, 0]).is_err());
        assert!(decode_metadata(&[1, b'a', 0xff, 0xff, 0xff, 0xff, 1]).is_err());
        assert!(encode_metadata(&[("".to_owned(), vec![])]).is_err());
        assert!(encode_metadata(&[("a b".to_owned(), vec![])]).is_err());
        assert!(encode_metadata(&[("n".repeat(256), vec![])]).is_err());
    }

    #[test]
    fn reply_encoding() {
        let r = ZapReply::allow(
            b"1".to_vec(),
            "curve:abc".into(),
            vec![("Roles".into(), b"user".to_vec())],
        );
        let frames = r.encode();
        assert_eq!(frames.len(), 6);
        assert_eq!(frames[0], b"1.0");
        assert_eq!(frames[1], b"1");
        assert_eq!(frames[2], b"200");
        assert_eq!(frames[4], b"curve:abc");
        assert_eq!(
            decode_metadata(&frames[5]).unwrap(),
            vec![("Roles".to_owned(), b"user".to_vec())]
        );
        let d = ZapReply::deny(b"1".to_vec(), "unknown key").encode();
        assert_eq!(d[2], b"400");
        assert!(d[4].is_empty() && d[5].is_empty());
        // Bad metadata fails closed.
        let mut bad = r.clone();
        bad.metadata.push(("bad name".into(), vec![]));
        let e = bad.encode();
        assert_eq!(e[2], b"500");
        assert!(e[4].is_empty());
    }
}
