use crate::{Roles, MAGIC, MAX_ROUTE, MAX_TOPIC, MAX_USERID, PROTOCOL_VERSION};

/// Flag: the sender wants no response (fire and forget).
pub const FLAG_NORESPONSE: u8 = 0x01;

/// Flag on a response: more responses to the same request follow (a
/// streaming request such as `exec.run`); every hop keeps its route state
/// until the response without it.
pub const FLAG_MORE: u8 = 0x02;

/// Flag on a request delivered to a service provider: the caller is a
/// client of the provider's own broker, so its principal was authenticated
/// by that broker itself (`SO_PEERCRED` or the key exchange), not stamped by
/// another broker. Only the delivering broker sets it.
pub const FLAG_DIRECT: u8 = 0x04;

/// Fixed part of the header, before the variable-length fields.
pub const FIXED_LEN: usize = 33;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MsgType {
    /// Addressed to a rank (or to "any"); gets exactly one response.
    Request = 1,
    /// Travels back along the request's route stack.
    Response = 2,
    /// Published through rank 0 to every rank, with a sequence number.
    Event = 3,
    /// Link-local broker-to-broker traffic (health deltas); never routed.
    Control = 4,
}

impl MsgType {
    fn from_u8(b: u8) -> Option<MsgType> {
        match b {
            1 => Some(MsgType::Request),
            2 => Some(MsgType::Response),
            3 => Some(MsgType::Event),
            4 => Some(MsgType::Control),
            _ => None,
        }
    }
}

/// One entry of a route stack: where a request entered a broker, so that the
/// response can leave the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hop {
    /// Came down from this broker's parent.
    Parent,
    /// Came up from the child broker of this rank.
    Child(u32),
    /// Came from a local client connection with this id.
    Local(u32),
}

impl Hop {
    fn encode(self, out: &mut Vec<u8>) {
        let (kind, id) = match self {
            Hop::Parent => (1u8, 0u32),
            Hop::Child(r) => (2, r),
            Hop::Local(c) => (3, c),
        };
        out.push(kind);
        out.extend_from_slice(&id.to_be_bytes());
    }

    /// `Parent` carries no id: it must be 0, so that every route stack has
    /// exactly one encoding (found by the `header` fuzz target).
    fn decode(kind: u8, id: u32) -> Option<Hop> {
        match kind {
            1 if id == 0 => Some(Hop::Parent),
            1 => None,
            2 => Some(Hop::Child(id)),
            3 => Some(Hop::Local(id)),
            _ => None,
        }
    }
}

/// A decoded message header. See `docs/protocol.md` for the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub msg_type: MsgType,
    pub flags: u8,
    /// Chosen by the requester; copied into the response to match them up.
    pub matchtag: u32,
    /// Requests: the destination rank, or [`crate::NODEID_ANY`].
    /// Responses: the rank that produced the response.
    pub nodeid: u32,
    /// 0 on success; otherwise an [`crate::errno`] value.
    pub errnum: u32,
    /// Events: the sequence number assigned by rank 0. 0 otherwise.
    pub seq: u64,
    /// The sender's roles, stamped by the ingress broker.
    pub roles: Roles,
    /// Service method (`broker.ping`) or event topic.
    pub topic: String,
    /// The sender's principal, stamped by the ingress broker.
    pub userid: String,
    /// Route stack; the last entry is the most recent hop.
    pub route: Vec<Hop>,
}

/// Why a header could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("message too short: {0} bytes, need at least {FIXED_LEN}; the peer is not speaking the canopy protocol")]
    TooShort(usize),
    #[error("bad magic byte 0x{0:02x}; the peer is not speaking the canopy protocol")]
    BadMagic(u8),
    #[error("unsupported protocol version {0} (this broker speaks {PROTOCOL_VERSION}); upgrade the older side")]
    Version(u8),
    #[error("unknown message type {0}; the peer is not speaking the canopy protocol")]
    BadType(u8),
    #[error("{field} is {len} bytes, more than the limit of {max}; shorten it")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("header length fields claim {claimed} bytes but the frame has {actual}; the message is truncated or corrupt")]
    Truncated { claimed: usize, actual: usize },
    #[error("{0} is not valid UTF-8; send text")]
    Utf8(&'static str),
    #[error("unknown route hop kind {0}; the message is corrupt")]
    BadHop(u8),
    #[error("route hop `parent` carries id {0}, not 0; the message is corrupt")]
    ParentId(u32),
}

impl Header {
    /// A new request to `nodeid`.
    pub fn request(topic: impl Into<String>, nodeid: u32, matchtag: u32) -> Header {
        Header {
            msg_type: MsgType::Request,
            flags: 0,
            matchtag,
            nodeid,
            errnum: 0,
            seq: 0,
            roles: Roles::NONE,
            topic: topic.into(),
            userid: String::new(),
            route: Vec::new(),
        }
    }

    /// A new event.
    pub fn event(topic: impl Into<String>, seq: u64) -> Header {
        Header {
            msg_type: MsgType::Event,
            seq,
            ..Header::request(topic, 0, 0)
        }
    }

    /// A control message.
    pub fn control(topic: impl Into<String>) -> Header {
        Header {
            msg_type: MsgType::Control,
            ..Header::request(topic, 0, 0)
        }
    }

    /// The response to this request, produced at `rank`, keeping the route
    /// stack so the response retraces the request's path.
    pub fn response(&self, rank: u32, errnum: u32) -> Header {
        Header {
            msg_type: MsgType::Response,
            flags: 0,
            matchtag: self.matchtag,
            nodeid: rank,
            errnum,
            seq: 0,
            roles: Roles::NONE,
            topic: self.topic.clone(),
            userid: String::new(),
            route: self.route.clone(),
        }
    }

    /// Encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        FIXED_LEN + self.topic.len() + self.userid.len() + 5 * self.route.len()
    }

    /// Encode, checking the limits that [`decode_header`] enforces.
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Encode, appending to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        check_len("topic", self.topic.len(), MAX_TOPIC)?;
        check_len("userid", self.userid.len(), MAX_USERID)?;
        check_len("route", self.route.len(), MAX_ROUTE)?;
        out.reserve(self.encoded_len());
        out.push(MAGIC);
        out.push(PROTOCOL_VERSION);
        out.push(self.msg_type as u8);
        out.push(self.flags);
        out.extend_from_slice(&self.matchtag.to_be_bytes());
        out.extend_from_slice(&self.nodeid.to_be_bytes());
        out.extend_from_slice(&self.errnum.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.roles.0.to_be_bytes());
        out.extend_from_slice(&(self.topic.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.userid.len() as u16).to_be_bytes());
        out.push(self.route.len() as u8);
        out.extend_from_slice(self.topic.as_bytes());
        out.extend_from_slice(self.userid.as_bytes());
        for hop in &self.route {
            hop.encode(out);
        }
        Ok(())
    }
}

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), ProtoError> {
    if len > max {
        Err(ProtoError::TooLong { field, len, max })
    } else {
        Ok(())
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decode a header frame. Never panics, whatever the bytes.
pub fn decode_header(b: &[u8]) -> Result<Header, ProtoError> {
    if b.len() < FIXED_LEN {
        return Err(ProtoError::TooShort(b.len()));
    }
    if b[0] != MAGIC {
        return Err(ProtoError::BadMagic(b[0]));
    }
    if b[1] != PROTOCOL_VERSION {
        return Err(ProtoError::Version(b[1]));
    }
    let msg_type = MsgType::from_u8(b[2]).ok_or(ProtoError::BadType(b[2]))?;
    let flags = b[3];
    let matchtag = be_u32(b, 4);
    let nodeid = be_u32(b, 8);
    let errnum = be_u32(b, 12);
    let seq = u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]);
    let roles = Roles(be_u32(b, 24));
    let topic_len = u16::from_be_bytes([b[28], b[29]]) as usize;
    let userid_len = u16::from_be_bytes([b[30], b[31]]) as usize;
    let route_len = b[32] as usize;
    check_len("topic", topic_len, MAX_TOPIC)?;
    check_len("userid", userid_len, MAX_USERID)?;
    check_len("route", route_len, MAX_ROUTE)?;
    let claimed = FIXED_LEN + topic_len + userid_len + 5 * route_len;
    if claimed != b.len() {
        return Err(ProtoError::Truncated {
            claimed,
            actual: b.len(),
        });
    }
    let mut at = FIXED_LEN;
    let topic = std::str::from_utf8(&b[at..at + topic_len])
        .map_err(|_| ProtoError::Utf8("topic"))?
        .to_string();
    at += topic_len;
    let userid = std::str::from_utf8(&b[at..at + userid_len])
        .map_err(|_| ProtoError::Utf8("userid"))?
        .to_string();
    at += userid_len;
    let mut route = Vec::with_capacity(route_len);
    for _ in 0..route_len {
        let id = be_u32(b, at + 1);
        let hop = Hop::decode(b[at], id).ok_or(match b[at] {
            1 => ProtoError::ParentId(id),
            kind => ProtoError::BadHop(kind),
        })?;
        route.push(hop);
        at += 5;
    }
    Ok(Header {
        msg_type,
        flags,
        matchtag,
        nodeid,
        errnum,
        seq,
        roles,
        topic,
        userid,
        route,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NODEID_ANY;

    fn sample() -> Header {
        Header {
            msg_type: MsgType::Request,
            flags: FLAG_NORESPONSE,
            matchtag: 0xdead_beef,
            nodeid: NODEID_ANY,
            errnum: 113,
            seq: 1 << 40,
            roles: Roles::USER.union(Roles::PEER),
            topic: "broker.ping".into(),
            userid: "alice@TEST.REALM".into(),
            route: vec![Hop::Local(7), Hop::Parent, Hop::Child(12)],
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let b = h.encode().unwrap();
        assert_eq!(b.len(), h.encoded_len());
        assert_eq!(decode_header(&b).unwrap(), h);
    }

    #[test]
    fn golden_bytes() {
        // Pins the layout documented in docs/protocol.md.
        let mut h = Header::request("a", 7, 0x01020304);
        h.route.push(Hop::Child(5));
        let b = h.encode().unwrap();
        let want: Vec<u8> = vec![
            0xCA, 1, 1, 0, // magic, version, type=request, flags
            1, 2, 3, 4, // matchtag
            0, 0, 0, 7, // nodeid
            0, 0, 0, 0, // errnum
            0, 0, 0, 0, 0, 0, 0, 0, // seq
            0, 0, 0, 0, // roles
            0, 1, 0, 0, 1,    // topic len, userid len, route count
            b'a', // topic
            2, 0, 0, 0, 5, // hop: child 5
        ];
        assert_eq!(b, want);
    }

    #[test]
    fn rejects_bad_input() {
        let good = sample().encode().unwrap();
        assert_eq!(decode_header(&good[..10]), Err(ProtoError::TooShort(10)));
        let mut b = good.clone();
        b[0] = 0;
        assert_eq!(decode_header(&b), Err(ProtoError::BadMagic(0)));
        let mut b = good.clone();
        b[1] = 9;
        assert_eq!(decode_header(&b), Err(ProtoError::Version(9)));
        let mut b = good.clone();
        b[2] = 99;
        assert_eq!(decode_header(&b), Err(ProtoError::BadType(99)));
        let mut b = good.clone();
        b.push(0);
        assert!(matches!(
            decode_header(&b),
            Err(ProtoError::Truncated { .. })
        ));
        let mut b = good.clone();
        b[32] = 200;
        assert!(matches!(
            decode_header(&b),
            Err(ProtoError::TooLong { field: "route", .. })
        ));
        let mut b = good.clone();
        b[FIXED_LEN] = 0xff; // first topic byte
        assert_eq!(decode_header(&b), Err(ProtoError::Utf8("topic")));
        let mut b = good;
        let last_hop = b.len() - 5;
        b[last_hop] = 9;
        assert_eq!(decode_header(&b), Err(ProtoError::BadHop(9)));
    }

    #[test]
    fn encode_enforces_limits() {
        let mut h = sample();
        h.topic = "x".repeat(MAX_TOPIC + 1);
        assert!(matches!(
            h.encode(),
            Err(ProtoError::TooLong { field: "topic", .. })
        ));
    }

    #[test]
    fn hostile_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix and every single-byte
        // corruption of a valid header decodes or errors, never panics.
        let good = sample().encode().unwrap();
        for n in 0..good.len() {
            let _ = decode_header(&good[..n]);
        }
        for i in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                let _ = decode_header(&b);
            }
        }
        let mut x: u32 = 12345;
        for _ in 0..20000 {
            let len = (x % 80) as usize;
            let mut buf = Vec::with_capacity(len);
            for _ in 0..len {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                buf.push((x >> 16) as u8);
            }
            if len > 3 {
                buf[0] = MAGIC;
                buf[1] = PROTOCOL_VERSION;
            }
            let _ = decode_header(&buf);
        }
    }

    #[test]
    fn parent_hop_has_one_encoding() {
        let mut h = sample();
        h.route = vec![Hop::Parent];
        let mut b = h.encode().unwrap();
        assert_eq!(decode_header(&b), Ok(h.clone()));
        let n = b.len();
        b[n - 1] = 16;
        assert_eq!(decode_header(&b), Err(ProtoError::ParentId(16)));
        b[n - 5] = 9;
        assert_eq!(decode_header(&b), Err(ProtoError::BadHop(9)));
    }

    #[test]
    fn response_keeps_route() {
        let h = sample();
        let r = h.response(3, 0);
        assert_eq!(r.msg_type, MsgType::Response);
        assert_eq!(r.matchtag, h.matchtag);
        assert_eq!(r.route, h.route);
        assert_eq!(r.nodeid, 3);
        assert!(r.userid.is_empty());
    }
}
