//! Any bytes a client can send on its stream: decoded as a ClientMessage
//! and validated into a domain control, or refused with a code. Nothing
//! panics, and what passes validation is within the documented limits.
#![no_main]

use call_service::convert;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use videocall_proto::v1 as pb;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = pb::ClientMessage::decode(data) else { return };
    let Some(pb::client_message::Kind::Control(c)) = msg.kind else { return };
    match convert::control(c) {
        Ok(ctl) => {
            assert!(!ctl.peer.is_empty() && ctl.peer.len() <= convert::MAX_USER_ID);
            assert!(!ctl.peer.chars().any(videocall_proto::text::is_refused_in_id));
            assert!(ctl.user_str.len() <= convert::MAX_USER_STR);
        }
        Err((code, reason)) => {
            assert_eq!(code, call_service::codes::INVALID_ARGUMENT);
            assert!(!reason.is_empty());
        }
    }
});
