//! The hello handshake: a child's first request to its parent.

use crate::topology::Topology;
use serde::{Deserialize, Serialize};

pub const HELLO_TOPIC: &str = "overlay.hello";

/// What a child says about itself when it joins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The rank the child claims.
    pub rank: u32,
    /// Its protocol version.
    pub version: u8,
    /// A random id for this incarnation of the child broker.
    pub session: u64,
    /// Identifies the instance the child believes it belongs to.
    pub instance: String,
    /// The last event the child saw, as (epoch, seq), so the parent can
    /// replay what it missed.
    #[serde(default)]
    pub last_event: Option<(u32, u64)>,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("hello serializes")
    }

    pub fn decode(b: &[u8]) -> Result<Hello, HelloError> {
        serde_json::from_slice(b).map_err(|e| HelloError::Malformed(e.to_string()))
    }
}

/// Why a parent refuses a hello.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelloError {
    #[error("malformed hello ({0}); the peer is not a canopy broker of this version")]
    Malformed(String),
    #[error("rank {claimed} is not a child of rank {parent}; check the instance size and fanout")]
    NotMyChild { claimed: u32, parent: u32 },
    #[error("protocol version {theirs} is not compatible with version {ours}; run the same canopy release on every node")]
    Version { theirs: u8, ours: u8 },
    #[error("rank {rank} authenticated as '{got}' but the key issued to rank {rank} is '{expected}'; a key may only join as its own rank")]
    WrongKey {
        rank: u32,
        got: String,
        expected: String,
    },
    #[error("rank {rank} is already online (session {session:x}) until its silence shows it gone; if this persists, another broker is claiming rank {rank}: stop it")]
    AlreadyOnline { rank: u32, session: u64 },
    #[error("child belongs to instance '{theirs}' but this broker is in instance '{ours}'; make both use the same config")]
    WrongInstance { theirs: String, ours: String },
}

/// The parent's view of the join attempt.
pub struct HelloCheck<'a> {
    pub topo: &'a Topology,
    pub my_rank: u32,
    pub my_version: u8,
    pub my_instance: &'a str,
    /// The principal ZAP authenticated on this connection.
    pub authenticated: &'a str,
    /// The principal issued to the claimed rank, if any is known.
    pub expected: Option<&'a str>,
    /// The session of a child already online at the claimed rank.
    pub online_session: Option<u64>,
}

impl HelloCheck<'_> {
    /// Apply the four checks, in order: rank, version, key, uniqueness.
    pub fn check(&self, hello: &Hello) -> Result<(), HelloError> {
        if !self.topo.is_child(self.my_rank, hello.rank) {
            return Err(HelloError::NotMyChild {
                claimed: hello.rank,
                parent: self.my_rank,
            });
        }
        if hello.version != self.my_version {
            return Err(HelloError::Version {
                theirs: hello.version,
                ours: self.my_version,
            });
        }
        if hello.instance != self.my_instance {
            return Err(HelloError::WrongInstance {
                theirs: hello.instance.clone(),
                ours: self.my_instance.to_string(),
            });
        }
        match self.expected {
            Some(e) if e == self.authenticated => {}
            other => {
                return Err(HelloError::WrongKey {
                    rank: hello.rank,
                    got: self.authenticated.to_string(),
                    expected: other.unwrap_or("(none)").to_string(),
                })
            }
        }
        if let Some(session) = self.online_session {
            return Err(HelloError::AlreadyOnline {
                rank: hello.rank,
                session,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(rank: u32) -> Hello {
        Hello {
            rank,
            version: 1,
            session: 77,
            instance: "abc".into(),
            last_event: None,
        }
    }

    fn check<'a>(topo: &'a Topology, auth: &'a str, online: Option<u64>) -> HelloCheck<'a> {
        HelloCheck {
            topo,
            my_rank: 1,
            my_version: 1,
            my_instance: "abc",
            authenticated: auth,
            expected: Some("curve:KEY3"),
            online_session: online,
        }
    }

    #[test]
    fn four_checks() {
        let t = Topology::new(8, 2).unwrap();
        assert_eq!(check(&t, "curve:KEY3", None).check(&hello(3)), Ok(()));
        assert!(matches!(
            check(&t, "curve:KEY3", None).check(&hello(5)),
            Err(HelloError::NotMyChild {
                claimed: 5,
                parent: 1
            })
        ));
        let mut h = hello(3);
        h.version = 2;
        assert!(matches!(
            check(&t, "curve:KEY3", None).check(&h),
            Err(HelloError::Version { theirs: 2, ours: 1 })
        ));
        assert!(matches!(
            check(&t, "curve:OTHER", None).check(&hello(3)),
            Err(HelloError::WrongKey { rank: 3, .. })
        ));
        assert!(matches!(
            check(&t, "curve:KEY3", Some(9)).check(&hello(3)),
            Err(HelloError::AlreadyOnline {
                rank: 3,
                session: 9
            })
        ));
        let mut h = hello(3);
        h.instance = "other".into();
        assert!(matches!(
            check(&t, "curve:KEY3", None).check(&h),
            Err(HelloError::WrongInstance { .. })
        ));
    }

    #[test]
    fn no_expected_key_is_refused() {
        let t = Topology::new(8, 2).unwrap();
        let mut c = check(&t, "curve:KEY3", None);
        c.expected = None;
        assert!(matches!(
            c.check(&hello(3)),
            Err(HelloError::WrongKey { .. })
        ));
    }

    #[test]
    fn codec() {
        let h = hello(3);
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        assert!(matches!(
            Hello::decode(b"\xff{"),
            Err(HelloError::Malformed(_))
        ));
        assert!(matches!(
            Hello::decode(br#"{"rank":1,"version":1,"session":1,"instance":"x","evil":1}"#),
            Err(HelloError::Malformed(_))
        ));
    }
}
