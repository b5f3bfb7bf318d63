//! The edge between protobuf and domain types: every message from the
//! network is validated here into a domain type, or refused with a clear
//! code, before it reaches the state machine.

use std::sync::Arc;
use std::time::SystemTime;

use videocall_proto::v1 as pb;

use crate::codes;
use crate::device::Outgoing;
use crate::domain::{
    CallSummary, Control, ControlKind, Event, EventKind, Initiator, Notice, Phase, UserState,
};

/// The longest user id, in bytes.
pub const MAX_USER_ID: usize = 128;
/// The longest user string of a control, in bytes.
pub const MAX_USER_STR: usize = 4096;

/// Why a user id is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserIdError {
    #[error("user id is empty")]
    Empty,
    #[error("user id is longer than {MAX_USER_ID} bytes")]
    TooLong,
    #[error("user id contains whitespace, control or format characters")]
    Invisible,
}

/// Checks a user id: 1..=128 bytes of UTF-8 without whitespace, control or
/// format characters (the set is in [`videocall_proto::text`]).
pub fn user_id(raw: &str) -> Result<Arc<str>, UserIdError> {
    if raw.is_empty() {
        Err(UserIdError::Empty)
    } else if raw.len() > MAX_USER_ID {
        Err(UserIdError::TooLong)
    } else if raw.chars().any(videocall_proto::text::is_refused_in_id) {
        Err(UserIdError::Invisible)
    } else {
        Ok(Arc::from(raw))
    }
}

/// Validates a control from a client into a domain [`Control`], or the
/// result code (and reason) to answer it with.
pub fn control(msg: pb::CallControl) -> Result<Control, (u32, &'static str)> {
    let invalid = |reason| Err((codes::INVALID_ARGUMENT, reason));
    let kind = match pb::EventType::try_from(msg.event_type) {
        Ok(pb::EventType::Request) => ControlKind::Request,
        Ok(pb::EventType::Reply) => ControlKind::Reply,
        Ok(pb::EventType::Finish) => ControlKind::Finish,
        Ok(pb::EventType::Start) => return invalid("START is sent by the server only"),
        Ok(pb::EventType::Unspecified) | Err(_) => return invalid("unknown event type"),
    };
    let peer = match user_id(&msg.peer_user_id) {
        Ok(p) => p,
        Err(UserIdError::Empty) => return invalid("empty peer user id"),
        Err(UserIdError::TooLong) => return invalid("peer user id longer than 128 bytes"),
        Err(UserIdError::Invisible) => {
            return invalid("peer user id contains whitespace, control or format characters");
        }
    };
    if msg.user_str.len() > MAX_USER_STR {
        return invalid("user string longer than 4096 bytes");
    }
    Ok(Control {
        kind,
        peer,
        code: msg.error_code,
        flags: msg.flags,
        param: msg.param,
        user_str: Arc::from(msg.user_str),
    })
}

pub fn event_type(kind: EventKind) -> pb::EventType {
    match kind {
        EventKind::Request => pb::EventType::Request,
        EventKind::Reply => pb::EventType::Reply,
        EventKind::Start => pb::EventType::Start,
        EventKind::Finish => pb::EventType::Finish,
    }
}

/// A device's message as sent on its stream.
pub fn server_message(o: &Outgoing) -> pb::ServerMessage {
    let kind = match o {
        Outgoing::Connected {
            user,
            conn,
            resume_token,
            resumed,
            parked_results: _,
        } => pb::server_message::Kind::Connected(pb::Connected {
            user_id: String::from(&**user),
            connection_id: conn.0.to_string(),
            resume_token: String::from(&**resume_token),
            resumed: *resumed,
            // The edge knows the credential, and fills it in.
            expires_at_ms: 0,
        }),
        Outgoing::Result {
            seq,
            code,
            call_id,
            reason,
        } => pb::server_message::Kind::Result(pb::ControlResult {
            seq: *seq,
            code: *code,
            call_id: call_id.map(|c| c.text()).unwrap_or_default(),
            message: reason.0.to_owned(),
        }),
        Outgoing::Event(e) => pb::server_message::Kind::Event(event_to_proto(e)),
    };
    pb::ServerMessage { kind: Some(kind) }
}

pub fn event_to_proto(e: &Event) -> pb::CallEvent {
    pb::CallEvent {
        event_type: event_type(e.kind) as i32,
        // `String::from` copies; `to_string` on an `Arc<str>` formats.
        peer_user_id: String::from(&*e.peer),
        error_code: e.code,
        flags: e.flags,
        param: e.param,
        user_str: String::from(&*e.user_str),
        call_id: e.call_id.text(),
    }
}

pub fn notice_to_proto(n: &Notice, time: SystemTime) -> pb::CallEventNotice {
    pb::CallEventNotice {
        event_type: event_type(n.kind) as i32,
        source_user_id: String::from(&*n.source),
        target_user_id: String::from(&*n.target),
        error_code: n.code,
        flags: n.flags,
        param: n.param,
        user_str: String::from(&*n.user_str),
        call_id: n.call_id.text(),
        time: Some(prost_types::Timestamp::from(time)),
        event_id: event_id(n),
        sequence: n.seq,
        decision_required: n.decision_required,
        initiator: match n.initiator {
            Initiator::Caller => pb::Initiator::Caller,
            Initiator::Callee => pb::Initiator::Callee,
            Initiator::Service => pb::Initiator::Service,
            Initiator::Business => pb::Initiator::Business,
        } as i32,
        caller_user_id: String::from(&*n.caller),
        callee_user_id: String::from(&*n.callee),
    }
}

/// `<call id>-<sequence>`: unique per notice, the same on a resend.
fn event_id(n: &Notice) -> String {
    let mut id = n.call_id.text();
    id.push('-');
    id.push_str(&n.seq.to_string());
    id
}

pub fn user_state(s: UserState) -> pb::UserState {
    match s {
        UserState::Offline => pb::UserState::Offline,
        UserState::Idle => pb::UserState::Idle,
        UserState::Calling => pb::UserState::Calling,
        UserState::Ringing => pb::UserState::Ringing,
        UserState::Talking => pb::UserState::Talking,
    }
}

pub fn call_info(c: &CallSummary) -> pb::CallInfo {
    let (phase, room) = match c.phase {
        Phase::Approving => (pb::CallPhase::Approving, 0),
        Phase::Ringing { .. } => (pb::CallPhase::Ringing, 0),
        Phase::Talking { room, .. } => (pb::CallPhase::Talking, room),
    };
    pb::CallInfo {
        call_id: c.call_id.to_string(),
        caller_user_id: c.caller.to_string(),
        callee_user_id: c.callee.to_string(),
        phase: phase as i32,
        room_id: room,
        flags: c.flags,
        param: c.param,
        user_str: c.user_str.to_string(),
        age_ms: u64::try_from(c.age.as_millis()).unwrap_or(u64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ctl(event_type: i32, peer: &str, user_str: String) -> pb::CallControl {
        pb::CallControl {
            seq: 1,
            event_type,
            peer_user_id: peer.into(),
            error_code: 0,
            flags: 0,
            param: 0,
            user_str,
        }
    }

    #[test]
    fn refuses_bad_controls_with_invalid_argument() {
        let bad = [
            ctl(0, "bob", String::new()),
            ctl(3, "bob", String::new()),
            ctl(99, "bob", String::new()),
            ctl(-1, "bob", String::new()),
            ctl(1, "", String::new()),
            ctl(1, &"x".repeat(129), String::new()),
            ctl(1, "bo\nb", String::new()),
            ctl(1, "bob alice", String::new()),
            ctl(1, "bob\u{2028}", String::new()),
            ctl(1, "\u{202E}bob", String::new()),
            ctl(1, "b\u{200B}ob", String::new()),
            ctl(1, "\u{FEFF}bob", String::new()),
            ctl(1, "bob", "x".repeat(MAX_USER_STR + 1)),
        ];
        for c in bad {
            assert_eq!(
                control(c.clone()).map_err(|e| e.0),
                Err(codes::INVALID_ARGUMENT),
                "{c:?}"
            );
        }
        assert!(control(ctl(1, "bob", "x".repeat(MAX_USER_STR))).is_ok());
        assert!(control(ctl(4, &"x".repeat(128), String::new())).is_ok());
    }

    proptest! {
        /// Any control decodes to a domain control or a refusal; nothing panics.
        #[test]
        fn any_control_is_validated(event_type in any::<i32>(), peer in ".{0,200}", user_str in ".{0,300}", code in any::<u32>()) {
            let mut c = ctl(event_type, &peer, user_str);
            c.error_code = code;
            match control(c) {
                Ok(ok) => {
                    prop_assert!(!ok.peer.is_empty() && ok.peer.len() <= MAX_USER_ID);
                    prop_assert_eq!(ok.code, code);
                }
                Err((code, reason)) => {
                    prop_assert_eq!(code, codes::INVALID_ARGUMENT);
                    prop_assert!(!reason.is_empty());
                }
            }
        }
    }
}
