//! The call state machine: pure, synchronous, no I/O and no clock reads.
//!
//! Every input (a device connecting or leaving, a control, an approval
//! verdict, a forced FINISH, the passing of time) is a method call that takes
//! the current time as an argument and appends the resulting [`Effect`]s to a
//! caller-provided buffer. The caller (the switchboard actor) performs them:
//! it delivers events to devices, asks the business service and forwards
//! notices. Because nothing here waits or reads a clock, every interleaving
//! can be driven from tests (see the property tests at the bottom).
//!
//! Invariants kept by every method ([`Machine::check_invariants`]):
//! - a user has at most one call, and a call's two users point back to it;
//! - a device takes part in at most one call;
//! - room ids are unique among live calls;
//! - when a call ends, both users are free in the same step.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::codes;

/// A point in time: the time elapsed since the service started. Supplied by
/// the caller, so tests control it completely.
pub type Time = Duration;

/// A user id: opaque, validated at the edge (1..=128 bytes).
pub type UserId = Arc<str>;

/// One connected device (one client stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// One call attempt. Chosen by the caller of [`Machine::control`] so that the
/// machine stays deterministic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug)]
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
    notice_seq: u32,
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
    fn ok(call_id: CallId) -> Self {
        Self {
            code: codes::OK,
            call_id: Some(call_id),
            reason: "",
        }
    }
    fn refused(code: u32, reason: &'static str) -> Self {
        Self {
            code,
            call_id: None,
            reason,
        }
    }
}

#[derive(Clone, Debug)]
struct User {
    conns: Vec<ConnId>,
    call: Option<CallId>,
}

/// Settings of the machine.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// How long a call may ring before the caller gets REPLY 100105.
    pub ring_timeout: Duration,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            ring_timeout: crate::defaults::duration(crate::defaults::RING_TIMEOUT),
        }
    }
}

/// All call state of one node. See the module docs.
#[derive(Debug)]
pub struct Machine {
    config: MachineConfig,
    users: HashMap<UserId, User>,
    conns: HashMap<ConnId, UserId>,
    calls: HashMap<CallId, Call>,
    /// Ring deadlines of ringing calls.
    timers: BTreeSet<(Time, CallId)>,
    /// Room ids of talking calls.
    rooms: HashSet<u32>,
    next_room: u32,
    /// Calls that ended while their approval was still out. Their notices
    /// wait here until the verdict comes back, so that the business service
    /// sees the REQUEST before the end of the call. The approval deadline
    /// bounds how long an entry lives.
    ended_while_approving: HashMap<CallId, Vec<Notice>>,
}

impl Machine {
    pub fn new(config: MachineConfig) -> Self {
        Self {
            config,
            users: HashMap::new(),
            conns: HashMap::new(),
            calls: HashMap::new(),
            timers: BTreeSet::new(),
            rooms: HashSet::new(),
            next_room: 0,
            ended_while_approving: HashMap::new(),
        }
    }

    // ----- inputs -------------------------------------------------------

    /// A device of `user` connected. If the user is being rung, the new
    /// device rings too.
    pub fn connect(&mut self, conn: ConnId, user: UserId, out: &mut Vec<Effect>) {
        if self.conns.contains_key(&conn) {
            return;
        }
        self.conns.insert(conn, user.clone());
        let entry = self.users.entry(user.clone()).or_insert_with(|| User {
            conns: Vec::new(),
            call: None,
        });
        entry.conns.push(conn);
        let Some(call_id) = entry.call else { return };
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        if call.callee != user {
            return;
        }
        if let Phase::Ringing { ringing, .. } = &mut call.phase {
            ringing.push(conn);
            out.push(Effect::Send {
                conn,
                event: request_event(call),
            });
        }
    }

    /// A device's stream ended. Its call ends if the device was needed for
    /// it: the peer hears 100106.
    pub fn disconnect(&mut self, conn: ConnId, now: Time, out: &mut Vec<Effect>) {
        let Some(user) = self.conns.remove(&conn) else {
            return;
        };
        let call_id = match self.users.get_mut(&user) {
            Some(u) => {
                u.conns.retain(|c| *c != conn);
                u.call
            }
            None => None,
        };
        if let Some(call_id) = call_id {
            self.on_device_lost(call_id, conn, &user, now, out);
        }
        self.forget_if_unused(&user);
    }

    fn on_device_lost(
        &mut self,
        call_id: CallId,
        conn: ConnId,
        user: &UserId,
        now: Time,
        out: &mut Vec<Effect>,
    ) {
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        let lost = codes::CONNECTION_LOST;
        if call.caller_conn == conn {
            match &call.phase {
                Phase::Approving => {
                    let n = notice(call, EventKind::Reply, lost, Initiator::Service, now);
                    self.end(call_id, vec![n], out);
                }
                Phase::Ringing { ringing, .. } => {
                    for &c in ringing {
                        out.push(finish_to_callee(call, c, lost, 0, 0, empty()));
                    }
                    let n = notice(call, EventKind::Reply, lost, Initiator::Service, now);
                    self.end(call_id, vec![n], out);
                }
                Phase::Talking { callee_conn, .. } => {
                    out.push(finish_to_callee(call, *callee_conn, lost, 0, 0, empty()));
                    let mut n = notice(call, EventKind::Finish, lost, Initiator::Service, now);
                    n.source = call.caller.clone();
                    n.target = call.callee.clone();
                    self.end(call_id, vec![n], out);
                }
            }
            return;
        }
        if call.callee != *user {
            return;
        }
        match &mut call.phase {
            Phase::Approving => {}
            Phase::Ringing { ringing, .. } => {
                ringing.retain(|c| *c != conn);
                if ringing.is_empty() {
                    out.push(reply_to_caller(call, lost, 0, 0, empty()));
                    let n = notice(call, EventKind::Reply, lost, Initiator::Service, now);
                    self.end(call_id, vec![n], out);
                }
            }
            Phase::Talking { callee_conn, .. } => {
                if *callee_conn == conn {
                    out.push(finish_to_caller(call, lost, 0, 0, empty()));
                    let mut n = notice(call, EventKind::Finish, lost, Initiator::Service, now);
                    n.source = call.callee.clone();
                    n.target = call.caller.clone();
                    self.end(call_id, vec![n], out);
                }
            }
        }
    }

    /// A control from a device. `new_call_id` names the call a REQUEST
    /// would create (unused otherwise). A non-zero outcome changes nothing.
    pub fn control(
        &mut self,
        conn: ConnId,
        ctl: &Control,
        new_call_id: CallId,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Outcome {
        let Some(user) = self.conns.get(&conn).cloned() else {
            return Outcome::refused(codes::NOT_IN_CALL, "unknown connection");
        };
        if ctl.peer == user {
            return Outcome::refused(codes::INVALID_ARGUMENT, "the peer is the sender itself");
        }
        if ctl.peer.is_empty() {
            return Outcome::refused(codes::INVALID_ARGUMENT, "empty peer user id");
        }
        match ctl.kind {
            ControlKind::Request => self.request(conn, user, ctl, new_call_id, now, out),
            ControlKind::Reply | ControlKind::Finish => self.answer(conn, user, ctl, now, out),
        }
    }

    fn request(
        &mut self,
        conn: ConnId,
        caller: UserId,
        ctl: &Control,
        call_id: CallId,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Outcome {
        if let Some(current) = self.users.get(&caller).and_then(|u| u.call) {
            // Glare: the sender is being called by the very peer it dials,
            // and the call has not started. However the two REQUESTs crossed,
            // this one gets REPLY 100103 (below) and the other call goes on.
            let glare = self.calls.get(&current).is_some_and(|c| {
                c.callee == caller
                    && c.caller == ctl.peer
                    && !matches!(c.phase, Phase::Talking { .. })
            });
            if !glare {
                return Outcome::refused(codes::ALREADY_IN_CALL, "the sender already has a call");
            }
        }
        let callee = ctl.peer.clone();
        let mut call = Call {
            id: call_id,
            caller: caller.clone(),
            callee: callee.clone(),
            caller_conn: conn,
            phase: Phase::Approving,
            flags: ctl.flags,
            param: ctl.param,
            user_str: ctl.user_str.clone(),
            requested_at: now,
            notice_seq: 0,
        };
        let refusal = match self.users.get(&callee) {
            None => Some(codes::OFFLINE),
            Some(u) if u.conns.is_empty() => Some(codes::OFFLINE),
            Some(u) if u.call.is_some() => Some(codes::BUSY),
            Some(_) => None,
        };
        if let Some(code) = refusal {
            // Never a live call: the caller hears REPLY at once, the business
            // service gets the attempt for its records.
            let mut req = notice(&mut call, EventKind::Request, 0, Initiator::Caller, now);
            req.flags = call.flags;
            req.param = call.param;
            req.user_str = call.user_str.clone();
            out.push(Effect::Notify(req));
            out.push(reply_to_caller(&call, code, 0, 0, empty()));
            out.push(Effect::Notify(notice(
                &mut call,
                EventKind::Reply,
                code,
                Initiator::Service,
                now,
            )));
            return Outcome::ok(call_id);
        }
        let mut req = notice(&mut call, EventKind::Request, 0, Initiator::Caller, now);
        req.flags = call.flags;
        req.param = call.param;
        req.user_str = call.user_str.clone();
        req.decision_required = true;
        out.push(Effect::Approve(req));
        // Both users are reserved before anybody is asked: this is what turns
        // glare (two users calling each other at once) into one call and one
        // REPLY 100103.
        self.reserve(&caller, call_id);
        self.reserve(&callee, call_id);
        self.calls.insert(call_id, call);
        Outcome::ok(call_id)
    }

    fn reserve(&mut self, user: &UserId, call_id: CallId) {
        self.users
            .entry(user.clone())
            .or_insert_with(|| User {
                conns: Vec::new(),
                call: None,
            })
            .call = Some(call_id);
    }

    /// REPLY or FINISH from a device.
    fn answer(
        &mut self,
        conn: ConnId,
        user: UserId,
        ctl: &Control,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Outcome {
        let no_call = Outcome::refused(codes::NOT_IN_CALL, "no call with this peer on this device");
        let Some((call_id, is_caller, talking)) = self.party(conn, &user, &ctl.peer) else {
            return no_call;
        };
        let (flags, param, us) = (ctl.flags, ctl.param, ctl.user_str.clone());
        match (ctl.kind, is_caller, talking) {
            // Hang-up after START, from either side.
            (ControlKind::Finish, _, true) => self.hang_up(call_id, is_caller, ctl, now, out),
            (ControlKind::Reply, _, true) => Outcome {
                call_id: Some(call_id),
                ..Outcome::refused(codes::NOT_ALLOWED, "the call has started; use FINISH")
            },
            // The caller gives up: FINISH, or REPLY 100101 as AnyChat sends.
            (ControlKind::Finish, true, false) => self.cancel(call_id, flags, param, us, now, out),
            (ControlKind::Reply, true, false) if ctl.code == codes::CANCELLED => {
                self.cancel(call_id, flags, param, us, now, out)
            }
            (ControlKind::Reply, true, false) => Outcome {
                call_id: Some(call_id),
                ..Outcome::refused(
                    codes::NOT_ALLOWED,
                    "a caller can only cancel (REPLY 100101 or FINISH)",
                )
            },
            // The callee answers from one of its ringing devices.
            (ControlKind::Reply, false, false) if ctl.code == codes::OK => {
                self.accept(call_id, conn, flags, param, us, now, out)
            }
            (ControlKind::Reply, false, false) => {
                self.reject(call_id, conn, ctl.code, flags, param, us, now, out)
            }
            (ControlKind::Finish, false, false) => {
                let code = if ctl.code == codes::OK {
                    codes::REJECTED
                } else {
                    ctl.code
                };
                self.reject(call_id, conn, code, flags, param, us, now, out)
            }
            (ControlKind::Request, _, _) => no_call,
        }
    }

    /// The call `user`'s device `conn` takes part in with `peer`: its id,
    /// whether the device is the caller's, and whether the call is talking.
    /// A callee's device takes part while it rings or once it answered.
    fn party(&self, conn: ConnId, user: &UserId, peer: &UserId) -> Option<(CallId, bool, bool)> {
        let call_id = self.users.get(user).and_then(|u| u.call)?;
        let call = self.calls.get(&call_id)?;
        let is_caller = call.caller == *user && call.caller_conn == conn;
        let is_callee = call.callee == *user
            && match &call.phase {
                Phase::Approving => false,
                Phase::Ringing { ringing, .. } => ringing.contains(&conn),
                Phase::Talking { callee_conn, .. } => *callee_conn == conn,
            };
        let their_peer = if is_caller {
            &call.callee
        } else {
            &call.caller
        };
        if !(is_caller || is_callee) || their_peer != peer {
            return None;
        }
        let talking = matches!(call.phase, Phase::Talking { .. });
        Some((call_id, is_caller, talking))
    }

    /// FINISH of a talking call, from either side: FINISH to both devices,
    /// and the call ends.
    fn hang_up(
        &mut self,
        call_id: CallId,
        is_caller: bool,
        ctl: &Control,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Outcome {
        let no_call = Outcome::refused(codes::NOT_IN_CALL, "no call with this peer on this device");
        let Some(call) = self.calls.get_mut(&call_id) else {
            return no_call;
        };
        let Phase::Talking { callee_conn, .. } = call.phase else {
            return no_call;
        };
        let (flags, param, us) = (ctl.flags, ctl.param, ctl.user_str.clone());
        out.push(finish_to_caller(call, codes::OK, flags, param, us.clone()));
        out.push(finish_to_callee(
            call,
            callee_conn,
            codes::OK,
            flags,
            param,
            us.clone(),
        ));
        let who = if is_caller {
            Initiator::Caller
        } else {
            Initiator::Callee
        };
        let mut n = notice(call, EventKind::Finish, codes::OK, who, now);
        if !is_caller {
            n.source = call.callee.clone();
            n.target = call.caller.clone();
        }
        with_payload(&mut n, flags, param, &us);
        self.end(call_id, vec![n], out);
        Outcome::ok(call_id)
    }

    fn cancel(
        &mut self,
        call_id: CallId,
        flags: u32,
        param: u32,
        us: Arc<str>,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Outcome {
        let Some(call) = self.calls.get_mut(&call_id) else {
            return Outcome::ok(call_id);
        };
        let code = codes::CANCELLED;
        out.push(reply_to_caller(call, code, flags, param, us.clone()));
        if let Phase::Ringing { ringing, .. } = &call.phase {
            for &c in ringing {
                out.push(finish_to_callee(call, c, code, flags, param, us.clone()));
            }
        }
        let mut n = notice(call, EventKind::Reply, code, Initiator::Caller, now);
        with_payload(&mut n, flags, param, &us);
        self.end(call_id, vec![n], out);
        Outcome::ok(call_id)
    }

    #[allow(clippy::too_many_arguments)]
    fn accept(
        &mut self,
        call_id: CallId,
        conn: ConnId,
        flags: u32,
        param: u32,
        us: Arc<str>,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Outcome {
        let room = self.allocate_room();
        let Some(call) = self.calls.get_mut(&call_id) else {
            return Outcome::ok(call_id);
        };
        let Phase::Ringing { deadline, ringing } = &call.phase else {
            return Outcome::ok(call_id);
        };
        self.timers.remove(&(*deadline, call_id));
        for &c in ringing.iter().filter(|c| **c != conn) {
            out.push(finish_to_callee(
                call,
                c,
                codes::ANSWERED_ELSEWHERE,
                0,
                0,
                empty(),
            ));
        }
        call.phase = Phase::Talking {
            callee_conn: conn,
            room,
        };
        self.rooms.insert(room);
        out.push(reply_to_caller(call, codes::OK, flags, param, us.clone()));
        let mut start = Event {
            kind: EventKind::Start,
            call_id,
            peer: call.callee.clone(),
            code: codes::OK,
            flags: call.flags,
            param: room,
            user_str: empty(),
        };
        out.push(Effect::Send {
            conn: call.caller_conn,
            event: start.clone(),
        });
        start.peer = call.caller.clone();
        out.push(Effect::Send { conn, event: start });
        let mut reply = notice(call, EventKind::Reply, codes::OK, Initiator::Callee, now);
        with_payload(&mut reply, flags, param, &us);
        out.push(Effect::Notify(reply));
        let mut start = notice(call, EventKind::Start, codes::OK, Initiator::Service, now);
        start.flags = call.flags;
        start.param = room;
        out.push(Effect::Notify(start));
        Outcome::ok(call_id)
    }

    #[allow(clippy::too_many_arguments)]
    fn reject(
        &mut self,
        call_id: CallId,
        conn: ConnId,
        code: u32,
        flags: u32,
        param: u32,
        us: Arc<str>,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Outcome {
        let Some(call) = self.calls.get_mut(&call_id) else {
            return Outcome::ok(call_id);
        };
        let Phase::Ringing { ringing, .. } = &call.phase else {
            return Outcome::ok(call_id);
        };
        out.push(reply_to_caller(call, code, flags, param, us.clone()));
        for &c in ringing {
            let (code, flags, param, us) = if c == conn {
                (code, flags, param, us.clone())
            } else {
                (codes::ANSWERED_ELSEWHERE, 0, 0, empty())
            };
            out.push(finish_to_callee(call, c, code, flags, param, us));
        }
        let mut n = notice(call, EventKind::Reply, code, Initiator::Callee, now);
        with_payload(&mut n, flags, param, &us);
        self.end(call_id, vec![n], out);
        Outcome::ok(call_id)
    }

    /// The business service's verdict (or the failure policy's) on a call's
    /// REQUEST.
    pub fn approval_done(
        &mut self,
        call_id: CallId,
        verdict: Verdict,
        now: Time,
        out: &mut Vec<Effect>,
    ) {
        if let Some(notices) = self.ended_while_approving.remove(&call_id) {
            out.extend(notices.into_iter().map(Effect::Notify));
            return;
        }
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        if call.phase != Phase::Approving {
            return;
        }
        let (code, initiator) = match verdict {
            Verdict::Refuse { code, initiator } if code != codes::OK => (code, initiator),
            _ => {
                let conns = self
                    .users
                    .get(&call.callee)
                    .map(|u| u.conns.clone())
                    .unwrap_or_default();
                if conns.is_empty() {
                    // Every device of the callee left during the approval.
                    (codes::OFFLINE, Initiator::Service)
                } else {
                    let deadline = now + self.config.ring_timeout;
                    for &c in &conns {
                        out.push(Effect::Send {
                            conn: c,
                            event: request_event(call),
                        });
                    }
                    call.phase = Phase::Ringing {
                        deadline,
                        ringing: conns,
                    };
                    self.timers.insert((deadline, call_id));
                    return;
                }
            }
        };
        out.push(reply_to_caller(call, code, 0, 0, empty()));
        let n = notice(call, EventKind::Reply, code, initiator, now);
        // The verdict is in: nothing to park.
        self.end_call(call_id, vec![n], false, out);
    }

    /// The business service ends a user's call (forced FINISH).
    pub fn force_finish(&mut self, f: &ForceFinish, now: Time, out: &mut Vec<Effect>) -> Outcome {
        let Some(call_id) = self.users.get(f.user.as_ref()).and_then(|u| u.call) else {
            return Outcome::refused(codes::NOT_IN_CALL, "the user has no call");
        };
        if f.only.is_some_and(|c| c != call_id) {
            return Outcome::refused(codes::NOT_IN_CALL, "the user's call is another call");
        }
        let Some(call) = self.calls.get_mut(&call_id) else {
            return Outcome::refused(codes::NOT_IN_CALL, "the user has no call");
        };
        let (code, flags, param) = (f.code, f.flags, f.param);
        let us = f.user_str.clone();
        let n = match &call.phase {
            Phase::Talking { callee_conn, .. } => {
                out.push(finish_to_caller(call, code, flags, param, us.clone()));
                out.push(finish_to_callee(
                    call,
                    *callee_conn,
                    code,
                    flags,
                    param,
                    us.clone(),
                ));
                notice(call, EventKind::Finish, code, Initiator::Business, now)
            }
            phase => {
                // A REPLY 0 would read as "accepted".
                let code = if code == codes::OK {
                    codes::TERMINATED
                } else {
                    code
                };
                out.push(reply_to_caller(call, code, flags, param, us.clone()));
                if let Phase::Ringing { ringing, .. } = phase {
                    for &c in ringing {
                        out.push(finish_to_callee(call, c, code, flags, param, us.clone()));
                    }
                }
                notice(call, EventKind::Reply, code, Initiator::Business, now)
            }
        };
        let mut n = n;
        with_payload(&mut n, flags, param, &us);
        self.end(call_id, vec![n], out);
        Outcome::ok(call_id)
    }

    /// Time has passed: calls ringing past their deadline end with 100105.
    pub fn tick(&mut self, now: Time, out: &mut Vec<Effect>) {
        while let Some(&(deadline, call_id)) = self.timers.first() {
            if deadline > now {
                break;
            }
            self.timers.pop_first();
            let Some(call) = self.calls.get_mut(&call_id) else {
                continue;
            };
            let Phase::Ringing { ringing, .. } = &call.phase else {
                continue;
            };
            let code = codes::NO_ANSWER;
            out.push(reply_to_caller(call, code, 0, 0, empty()));
            for &c in ringing {
                out.push(finish_to_callee(call, c, code, 0, 0, empty()));
            }
            let n = notice(call, EventKind::Reply, code, Initiator::Service, now);
            self.end(call_id, vec![n], out);
        }
    }

    /// The earliest ring deadline, if any call is ringing.
    pub fn next_deadline(&self) -> Option<Time> {
        self.timers.first().map(|(t, _)| *t)
    }

    // ----- queries ------------------------------------------------------

    pub fn user_state(&self, user: &str) -> (UserState, usize, Option<&Call>) {
        let Some(u) = self.users.get(user) else {
            return (UserState::Offline, 0, None);
        };
        let call = u.call.and_then(|id| self.calls.get(&id));
        let state = match call {
            None if u.conns.is_empty() => UserState::Offline,
            None => UserState::Idle,
            Some(c) => match c.phase {
                Phase::Talking { .. } => UserState::Talking,
                _ if c.caller.as_ref() == user => UserState::Calling,
                _ => UserState::Ringing,
            },
        };
        (state, u.conns.len(), call)
    }

    pub fn calls(&self) -> impl Iterator<Item = &Call> {
        self.calls.values()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Live calls by phase: (approving, ringing, talking). O(calls).
    pub fn phase_counts(&self) -> (usize, usize, usize) {
        self.calls
            .values()
            .fold((0, 0, 0), |(a, r, t), c| match c.phase {
                Phase::Approving => (a + 1, r, t),
                Phase::Ringing { .. } => (a, r + 1, t),
                Phase::Talking { .. } => (a, r, t + 1),
            })
    }

    // ----- internals ----------------------------------------------------

    /// Ends a call: frees both users and the room at once, and emits (or,
    /// while its approval is out, parks) the call's last notices.
    fn end(&mut self, call_id: CallId, notices: Vec<Notice>, out: &mut Vec<Effect>) {
        self.end_call(call_id, notices, true, out);
    }

    /// [`Machine::end`]; `approval_out` is false when the verdict of an
    /// approving call has just come in.
    fn end_call(
        &mut self,
        call_id: CallId,
        notices: Vec<Notice>,
        approval_out: bool,
        out: &mut Vec<Effect>,
    ) {
        let Some(call) = self.calls.remove(&call_id) else {
            return;
        };
        match call.phase {
            Phase::Approving if approval_out => {
                self.ended_while_approving.insert(call_id, notices);
            }
            Phase::Approving => out.extend(notices.into_iter().map(Effect::Notify)),
            Phase::Ringing { deadline, .. } => {
                self.timers.remove(&(deadline, call_id));
                out.extend(notices.into_iter().map(Effect::Notify));
            }
            Phase::Talking { room, .. } => {
                self.rooms.remove(&room);
                out.extend(notices.into_iter().map(Effect::Notify));
            }
        }
        for user in [&call.caller, &call.callee] {
            if let Some(u) = self.users.get_mut(user).filter(|u| u.call == Some(call_id)) {
                u.call = None;
            }
            self.forget_if_unused(user);
        }
    }

    fn forget_if_unused(&mut self, user: &UserId) {
        if self
            .users
            .get(user)
            .is_some_and(|u| u.conns.is_empty() && u.call.is_none())
        {
            self.users.remove(user);
        }
    }

    /// The next room id not used by a live call (never 0, which means "no
    /// room"). At most `rooms.len() + 1` probes.
    fn allocate_room(&mut self) -> u32 {
        loop {
            self.next_room = self.next_room.wrapping_add(1);
            if self.next_room != 0 && !self.rooms.contains(&self.next_room) {
                return self.next_room;
            }
        }
    }

    /// Checks every structural invariant; returns the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen_conns = HashSet::new();
        let mut seen_rooms = HashSet::new();
        for (id, call) in &self.calls {
            if call.id != *id {
                return Err(format!("call {id} stored under another id"));
            }
            for u in [&call.caller, &call.callee] {
                match self.users.get(u) {
                    Some(user) if user.call == Some(*id) => {}
                    _ => return Err(format!("user {u} does not point back to call {id}")),
                }
            }
            if call.caller == call.callee {
                return Err(format!("call {id} has one user on both sides"));
            }
            if self.conns.get(&call.caller_conn) != Some(&call.caller) {
                return Err(format!("call {id}: caller device is not the caller's"));
            }
            let mut devices = vec![call.caller_conn];
            match &call.phase {
                Phase::Approving => {}
                Phase::Ringing { deadline, ringing } => {
                    if ringing.is_empty() {
                        return Err(format!("call {id} rings no device"));
                    }
                    if !self.timers.contains(&(*deadline, *id)) {
                        return Err(format!("call {id} rings without a timer"));
                    }
                    devices.extend(ringing);
                    if ringing
                        .iter()
                        .any(|c| self.conns.get(c) != Some(&call.callee))
                    {
                        return Err(format!("call {id} rings a device that is not the callee's"));
                    }
                }
                Phase::Talking { callee_conn, room } => {
                    if self.conns.get(callee_conn) != Some(&call.callee) {
                        return Err(format!("call {id}: callee device is not the callee's"));
                    }
                    if !seen_rooms.insert(*room) || !self.rooms.contains(room) || *room == 0 {
                        return Err(format!("call {id}: room {room} not unique or not recorded"));
                    }
                    devices.push(*callee_conn);
                }
            }
            for d in devices {
                if !seen_conns.insert(d) {
                    return Err(format!("device {d:?} takes part in two calls"));
                }
            }
        }
        if seen_rooms.len() != self.rooms.len() {
            return Err("a room is recorded with no live call".into());
        }
        let ringing = self
            .calls
            .values()
            .filter(|c| matches!(c.phase, Phase::Ringing { .. }))
            .count();
        if self.timers.len() != ringing {
            return Err("a timer is left for a call that is not ringing".into());
        }
        for (name, user) in &self.users {
            if let Some(id) = user.call {
                if !self.calls.contains_key(&id) {
                    return Err(format!("user {name} is held by ended call {id}"));
                }
            } else if user.conns.is_empty() {
                return Err(format!("user {name} is kept with no device and no call"));
            }
            for c in &user.conns {
                if self.conns.get(c) != Some(name) {
                    return Err(format!("device {c:?} of {name} is not registered to it"));
                }
            }
        }
        Ok(())
    }
}

fn empty() -> Arc<str> {
    Arc::from("")
}

fn with_payload(n: &mut Notice, flags: u32, param: u32, us: &Arc<str>) {
    n.flags = flags;
    n.param = param;
    n.user_str = us.clone();
}

fn request_event(call: &Call) -> Event {
    Event {
        kind: EventKind::Request,
        call_id: call.id,
        peer: call.caller.clone(),
        code: codes::OK,
        flags: call.flags,
        param: call.param,
        user_str: call.user_str.clone(),
    }
}

fn reply_to_caller(call: &Call, code: u32, flags: u32, param: u32, us: Arc<str>) -> Effect {
    Effect::Send {
        conn: call.caller_conn,
        event: Event {
            kind: EventKind::Reply,
            call_id: call.id,
            peer: call.callee.clone(),
            code,
            flags,
            param,
            user_str: us,
        },
    }
}

fn finish_to_caller(call: &Call, code: u32, flags: u32, param: u32, us: Arc<str>) -> Effect {
    Effect::Send {
        conn: call.caller_conn,
        event: Event {
            kind: EventKind::Finish,
            call_id: call.id,
            peer: call.callee.clone(),
            code,
            flags,
            param,
            user_str: us,
        },
    }
}

fn finish_to_callee(
    call: &Call,
    conn: ConnId,
    code: u32,
    flags: u32,
    param: u32,
    us: Arc<str>,
) -> Effect {
    Effect::Send {
        conn,
        event: Event {
            kind: EventKind::Finish,
            call_id: call.id,
            peer: call.caller.clone(),
            code,
            flags,
            param,
            user_str: us,
        },
    }
}

/// The next notice of `call`, directed by kind: REQUEST and START from the
/// caller, REPLY from the callee, FINISH from the caller unless the caller of
/// this function says otherwise.
fn notice(call: &mut Call, kind: EventKind, code: u32, initiator: Initiator, at: Time) -> Notice {
    call.notice_seq += 1;
    let (source, target) = match kind {
        EventKind::Reply => (call.callee.clone(), call.caller.clone()),
        _ => (call.caller.clone(), call.callee.clone()),
    };
    Notice {
        kind,
        call_id: call.id,
        seq: call.notice_seq,
        source,
        target,
        caller: call.caller.clone(),
        callee: call.callee.clone(),
        code,
        flags: 0,
        param: 0,
        user_str: empty(),
        decision_required: false,
        initiator,
        at,
        requested_at: call.requested_at,
    }
}

#[cfg(test)]
mod tests;
