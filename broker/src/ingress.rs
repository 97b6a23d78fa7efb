//! What arrived on a ZeroMQ socket, made into an input for the core: the
//! frames checked and decoded, and stamped with the identity the transport
//! authenticated (the ZAP `User-Id`, roles and scope libzmq attaches to
//! every frame; a Kerberos key binding that still holds). No socket is
//! read here: the shell receives, and hands the frames over.
//!
//! Security decisions here are defence in depth, never the first line: a
//! frame without an authenticated `User-Id` or roles is dropped (ZAP must
//! have put them there), and so is one whose key binding has expired.

use crate::authz::BrokerPolicy;
use crate::core::Input;
use crate::sockets::{split, Frame};
use canopy_overlay::hello::HELLO_TOPIC;
use canopy_proto::{decode_header, Grant, Roles};
use tracing::warn;

/// A message from a remote client: routing id `rid`, then its frames.
pub(crate) fn from_remote(
    policy: &BrokerPolicy,
    rid: zmq::Message,
    parts: Vec<zmq::Message>,
) -> Option<Input<Frame>> {
    let Some((mut hframe, payload)) = split(parts) else {
        warn!(verdict = %"deny", "remote: dropped a message with the wrong number of frames; expected 1 or 2");
        return None;
    };
    let user_id = hframe.gets("User-Id").unwrap_or("").to_string();
    let roles = hframe
        .gets("Roles")
        .and_then(|r| Roles::parse_list(r).ok())
        .unwrap_or(Roles::NONE);
    let address = hframe.gets("Peer-Address").unwrap_or("").to_string();
    let grant = match hframe.gets(canopy_zap::SCOPE_PROPERTY) {
        None => Grant::plain(roles),
        Some(scope) => match Grant::decode_scope(roles, scope) {
            Ok(g) => g,
            Err(e) => {
                warn!(verdict = %"deny", principal = %user_id, "remote: message dropped: {e}");
                return None;
            }
        },
    };
    if user_id.is_empty() || grant.is_empty() {
        // Defence in depth: ZAP must have authenticated this peer.
        warn!(verdict = %"deny", address = %address, reason = %"no authenticated User-Id or roles on the message", "remote: message dropped");
        return None;
    }
    if !crate::gss::client_message_allowed(policy, &mut hframe, &user_id, &rid) {
        return None;
    }
    match decode_header(&hframe) {
        Ok(header) => Some(Input::Remote {
            rid: rid.to_vec(),
            user_id,
            grant,
            address,
            header,
            payload,
        }),
        Err(e) => {
            warn!(principal = %user_id, "remote: dropped an undecodable message: {e}");
            None
        }
    }
}

/// A message from a child broker: routing id `rid`, then its frames.
pub(crate) fn from_child(
    policy: &BrokerPolicy,
    rid: zmq::Message,
    mut parts: Vec<zmq::Message>,
) -> Option<Input<Frame>> {
    // The routing-id frame is made locally and carries no metadata; frames
    // that came over the wire carry the ZAP User-Id.
    let user_id = parts
        .first_mut()
        .and_then(|m| m.gets("User-Id").map(str::to_string))
        .unwrap_or_default();
    if !crate::gss::message_allowed(policy, parts.first_mut(), &user_id) {
        return Some(Input::ChildUnbound { rid: rid.to_vec() });
    }
    let Some((mut hframe, payload)) = split(parts) else {
        warn!(principal = %user_id, "overlay: dropped a message from a child with the wrong number of frames; expected 1 or 2");
        return None;
    };
    let header = match decode_header(&hframe) {
        Ok(h) => h,
        Err(e) => {
            warn!(principal = %user_id, "overlay: dropped an undecodable message: {e}");
            return None;
        }
    };
    let address = if header.topic == HELLO_TOPIC {
        hframe.gets("Peer-Address").unwrap_or("").to_string()
    } else {
        String::new()
    };
    Some(Input::Child {
        rid: rid.to_vec(),
        user_id,
        address,
        header,
        payload,
    })
}

/// A message from the parent: its first frame, then the rest (a DEALER
/// has no routing id; the parent is the one peer its CURVE key admits).
pub(crate) fn from_parent(
    first: zmq::Message,
    mut parts: Vec<zmq::Message>,
) -> Option<Input<Frame>> {
    parts.insert(0, first);
    let Some((hframe, payload)) = split(parts) else {
        warn!("overlay: dropped a message from the parent with the wrong number of frames");
        return None;
    };
    match decode_header(&hframe) {
        Ok(header) => Some(Input::Parent { header, payload }),
        Err(e) => {
            warn!("overlay: dropped an undecodable message from the parent: {e}");
            None
        }
    }
}
