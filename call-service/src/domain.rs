//! The values of the call domain: ids, controls, events, notices, the
//! effects the rules produce, and the call record itself. Shared by the
//! rules ([`crate::machine`]), the store ([`crate::store`]), the device
//! queues and the edge; depends on nothing of theirs.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::codes;

/// A point in time: wall-clock, since the Unix epoch, so that a deadline
/// means the same on every node (see [`crate::clock::Clock`]). Supplied by
/// the caller, so tests control it completely.
pub type Time = Duration;

/// A user id: opaque, validated at the edge (1..=128 bytes).
pub type UserId = Arc<str>;

/// One connected device (one client stream).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ConnId(pub u64);

/// One call attempt. Chosen by the caller of [`Machine::control`] so that the
/// machine stays deterministic.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct CallId(pub Uuid);

impl std::fmt::Display for CallId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl CallId {
    /// The id as text (hyphenated, lower case), as on the wire. Encoded
    /// directly: this runs for every event and notice, and `to_string` goes
    /// through the formatting machinery.
    pub fn text(&self) -> String {
        self.0
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .to_owned()
    }
}

/// The four event types of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum EventKind {
    Request,
    Reply,
    Start,
    Finish,
}

/// What a device asks for. START is not here: only the server sends it, and
/// the edge refuses it from clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlKind {
    Request,
    Reply,
    Finish,
}

/// A validated call control.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Control {
    pub kind: ControlKind,
    pub peer: UserId,
    pub code: u32,
    pub flags: u32,
    pub param: u32,
    pub user_str: Arc<str>,
}

/// A call event for one device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub call_id: CallId,
    /// The other party (never the receiving device's own user).
    pub peer: UserId,
    pub code: u32,
    pub flags: u32,
    pub param: u32,
    pub user_str: Arc<str>,
}

/// Who caused an event (mirrors `videocall.v1.Initiator`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Initiator {
    Caller,
    Callee,
    Service,
    Business,
}

/// A call event for the business hook.
///
/// The notices of one call follow the caller's line: REQUEST, then REPLY,
/// then, only if the REPLY was 0, START and FINISH. `seq` counts them from 1.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Notice {
    pub kind: EventKind,
    pub call_id: CallId,
    pub seq: u32,
    pub source: UserId,
    pub target: UserId,
    pub caller: UserId,
    pub callee: UserId,
    pub code: u32,
    pub flags: u32,
    pub param: u32,
    pub user_str: Arc<str>,
    pub decision_required: bool,
    pub initiator: Initiator,
    pub at: Time,
    /// When the call was requested (for setup latency).
    pub requested_at: Time,
}

/// Something the owner of the machine must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Deliver an event to one device.
    Send { conn: ConnId, event: Event },
    /// Ask the business service about this REQUEST and feed the verdict back
    /// with [`Machine::approval_done`], always (the failure policy turns
    /// errors and timeouts into a verdict).
    Approve(Notice),
    /// Tell the business service about an event; nothing waits for it.
    Notify(Notice),
}

/// A forced FINISH from the business service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForceFinish {
    /// Whose call to end.
    pub user: UserId,
    /// End it only if it is this call.
    pub only: Option<CallId>,
    /// The reason both parties get.
    pub code: u32,
    pub flags: u32,
    pub param: u32,
    pub user_str: Arc<str>,
}

/// The business service's answer to an approval, after the failure policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused with this (non-zero) code, by the business service itself or
    /// by the failure policy.
    Refuse {
        code: u32,
        initiator: Initiator,
    },
}

/// The phase of a live call.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    /// Waiting for the business service; the callee has heard nothing.
    Approving,
    /// The callee's devices in `ringing` have received REQUEST.
    Ringing {
        deadline: Time,
        ringing: Vec<ConnId>,
    },
    /// START was sent to `caller_conn` and `callee_conn`.
    Talking { callee_conn: ConnId, room: u32 },
}

/// A live call.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Call {
    pub id: CallId,
    pub caller: UserId,
    pub callee: UserId,
    pub caller_conn: ConnId,
    pub phase: Phase,
    pub flags: u32,
    pub param: u32,
    pub user_str: Arc<str>,
    pub requested_at: Time,
    /// The seq of the last notice of this call.
    pub(crate) notice_seq: u32,
}

impl Call {
    /// What the admin API lists of it, `now` giving its age.
    pub fn summary(&self, now: Time) -> CallSummary {
        CallSummary {
            call_id: self.id,
            caller: self.caller.clone(),
            callee: self.callee.clone(),
            phase: self.phase.clone(),
            flags: self.flags,
            param: self.param,
            user_str: self.user_str.clone(),
            age: now.saturating_sub(self.requested_at),
        }
    }
}

/// A live call as listed by the admin API.
#[derive(Clone, Debug)]
pub struct CallSummary {
    pub call_id: CallId,
    pub caller: UserId,
    pub callee: UserId,
    pub phase: Phase,
    pub flags: u32,
    pub param: u32,
    pub user_str: Arc<str>,
    pub age: Duration,
}

/// A user's state as reported by the admin API.
#[derive(Clone, Debug)]
pub struct UserSummary {
    pub state: UserState,
    pub connections: usize,
    pub call: Option<CallSummary>,
}

/// What a user is doing (mirrors `videocall.v1.UserState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserState {
    Offline,
    Idle,
    Calling,
    Ringing,
    Talking,
}

/// The answer to a control: a result code, and the call it applied to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub code: u32,
    pub call_id: Option<CallId>,
    /// Why a non-zero code was given, for logs and the client.
    pub reason: &'static str,
}

impl Outcome {
    pub(crate) fn ok(call_id: CallId) -> Self {
        Self {
            code: codes::OK,
            call_id: Some(call_id),
            reason: "",
        }
    }
    pub(crate) fn refused(code: u32, reason: &'static str) -> Self {
        Self {
            code,
            call_id: None,
            reason,
        }
    }
}
