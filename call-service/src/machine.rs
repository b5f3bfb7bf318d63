//! The call rules: pure, synchronous, no I/O and no clock reads.
//!
//! Every input (a device connecting, resuming or leaving, a control, an
//! approval verdict, a forced FINISH, the passing of time) is one
//! transition over the records of [`crate::store`]: a [`Step`] reads the
//! records it needs through a transaction, changes them, and pushes the
//! resulting [`Effect`]s; the store commits the whole or nothing, and a
//! conflict runs the input again from fresh records. The current time is
//! an argument, so every interleaving can be driven from tests (see the
//! property tests in `machine/tests.rs`, and `fuzz/`).
//!
//! [`Machine`] is the rules over the one-node [`MemoryStore`]: what the
//! switchboard actor owns.
//!
//! Invariants kept by every transition ([`check_invariants`]):
//! - a user has at most one call, and a call's two users point back to it;
//! - a device takes part in at most one call;
//! - room ids are unique among live calls;
//! - when a call ends, both users are free in the same step.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::codes;
use crate::device::Outgoing;
pub use crate::domain::*;
use crate::store::{
    self, Delivery, DeviceRec, MemoryStore, NodeId, Records, Store, Timer, Transition, Txn, UserRec,
};

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

/// Why a device was given up by the machine itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GivenUp {
    /// It parked more than [`store::PARK_LIMIT`] messages while detached.
    Overflowed(ConnId),
    /// Its grace window passed without a resume.
    Expired(ConnId),
}

/// The call rules over a store of records. Every input is one transition
/// ([`store::transact`]): the rules read the records it needs, and what
/// they change is committed whole, with its effects. See the module docs.
#[derive(Debug)]
pub struct Machine {
    config: MachineConfig,
    node: NodeId,
    store: MemoryStore,
    /// The buffers every transition borrows (see [`store::transact`]).
    buf: Transition,
    /// The latest time an input brought: what a transition without a time
    /// of its own (a device given up after parking too much) stamps its
    /// notices with.
    now: Time,
    /// Devices given up since [`Machine::take_given_up`] was last called.
    given_up: Vec<GivenUp>,
}

/// A refusal for an input whose commit kept losing races.
pub(crate) const CONTENDED: Outcome = Outcome {
    code: codes::OVERLOADED,
    call_id: None,
    reason: "the call state kept changing under this control; try again",
};

impl Machine {
    pub fn new(config: MachineConfig) -> Self {
        Self {
            config,
            node: NodeId(1),
            store: MemoryStore::new(),
            buf: Transition::default(),
            now: Duration::ZERO,
            given_up: Vec::new(),
        }
    }

    /// This node, part of every device id it hands out.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Runs one input as a transition and performs what its commit hands
    /// back: effects to `out`, and devices that parked past their limit
    /// given up, each a transition of its own.
    fn run<T>(
        &mut self,
        now: Time,
        out: &mut Vec<Effect>,
        mut rule: impl FnMut(&mut Step<'_, '_>, &mut Vec<Effect>) -> T,
    ) -> Option<T> {
        let ring_timeout = self.config.ring_timeout;
        self.now = self.now.max(now);
        let now = self.now;
        let (value, mut overflowed) =
            store::transact(&mut self.store, &mut self.buf, out, |t, o| {
                rule(&mut Step { t, ring_timeout }, o)
            })?;
        while let Some(conn) = overflowed.pop() {
            self.given_up.push(GivenUp::Overflowed(conn));
            if let Some(((), more)) =
                store::transact(&mut self.store, &mut self.buf, out, |t, o| {
                    Step { t, ring_timeout }.drop_device(conn, now, o)
                })
            {
                overflowed.extend(more);
            }
        }
        Some(value)
    }

    // ----- inputs -------------------------------------------------------

    /// A device of `user` connected. If the user is being rung, the new
    /// device rings too.
    pub fn connect(&mut self, conn: ConnId, user: UserId, out: &mut Vec<Effect>) {
        let token: Arc<str> = Arc::from(format!("device-{}", conn.0));
        let _ = self.attach(conn, user, token, usize::MAX, out);
    }

    /// A new device of `user` with its first stream, unless the user has
    /// `max_devices` already (their number is the error).
    pub fn attach(
        &mut self,
        conn: ConnId,
        user: UserId,
        resume_token: Arc<str>,
        max_devices: usize,
        out: &mut Vec<Effect>,
    ) -> Result<(), usize> {
        let node = self.node;
        self.run(self.now, out, |s, o| {
            s.attach(conn, &user, node, &resume_token, max_devices, o)
        })
        .unwrap_or(Err(0))
    }

    /// A new stream takes the device `token` names, if it is `user`'s: the
    /// device's new epoch and what it parked. The token is used up; the
    /// device's next one is `next_token`.
    pub fn resume(
        &mut self,
        user: &UserId,
        token: &str,
        next_token: Arc<str>,
    ) -> Option<(ConnId, u64, VecDeque<Outgoing>)> {
        let node = self.node;
        self.run(self.now, &mut Vec::new(), |s, _| {
            s.resume(user, token, &next_token, node)
        })
        .flatten()
    }

    /// The stream `epoch` of a device ended. Kept detached until
    /// `keep_until` (the stream broke within a grace window), or gone.
    /// Nothing happens if a newer stream holds the device.
    pub fn stream_ended(
        &mut self,
        conn: ConnId,
        epoch: u64,
        keep_until: Option<Time>,
        now: Time,
        out: &mut Vec<Effect>,
    ) {
        self.run(now, out, |s, o| {
            s.stream_ended(conn, epoch, keep_until, now, o)
        });
    }

    /// A device is gone: its call ends if the device was needed for it
    /// (the peer hears 100106).
    pub fn disconnect(&mut self, conn: ConnId, now: Time, out: &mut Vec<Effect>) {
        self.run(now, out, |s, o| s.drop_device(conn, now, o));
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
        self.control_from(conn, None, ctl, new_call_id, now, out)
            .unwrap_or(CONTENDED)
    }

    /// [`Machine::control`] from the device's stream `epoch`: `None` if
    /// another stream holds the device now (the control acts on nothing).
    pub fn control_from(
        &mut self,
        conn: ConnId,
        epoch: Option<u64>,
        ctl: &Control,
        new_call_id: CallId,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Option<Outcome> {
        match self.run(now, out, |s, o| {
            s.control(conn, epoch, ctl, new_call_id, now, o)
        }) {
            Some(o) => o,
            None => Some(CONTENDED),
        }
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
        self.run(now, out, |s, o| s.approval_done(call_id, verdict, now, o));
    }

    /// The business service ends a user's call (forced FINISH).
    pub fn force_finish(&mut self, f: &ForceFinish, now: Time, out: &mut Vec<Effect>) -> Outcome {
        self.run(now, out, |s, o| s.force_finish(f, now, o))
            .unwrap_or(CONTENDED)
    }

    /// Time has passed: calls ringing past their deadline end with 100105,
    /// detached devices past their grace window are given up.
    pub fn tick(&mut self, now: Time, out: &mut Vec<Effect>) {
        for timer in self.store.due(now) {
            match timer {
                Timer::Ring(call_id) => {
                    self.run(now, out, |s, o| s.ring_out(call_id, now, o));
                }
                Timer::Grace(conn) => {
                    if self.run(now, out, |s, o| s.expire(conn, now, o)) == Some(true) {
                        self.given_up.push(GivenUp::Expired(conn));
                    }
                }
            }
        }
    }

    /// The earliest timer (a ring deadline, a grace window), if any.
    pub fn next_deadline(&self) -> Option<Time> {
        self.store.next_timer()
    }

    /// A message for one device outside any call event (a control's
    /// result): the device's stream gets it if attached, else it is parked.
    /// `None` if there is nothing to deliver now.
    pub fn deliver(
        &mut self,
        conn: ConnId,
        msg: Outgoing,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Option<Outgoing> {
        match self.store.deliver(conn, msg) {
            Delivery::Attached(msg) => Some(msg),
            Delivery::Parked | Delivery::Gone => None,
            Delivery::Overflowed => {
                self.given_up.push(GivenUp::Overflowed(conn));
                self.disconnect(conn, now, out);
                None
            }
        }
    }

    /// Devices given up by the machine itself since the last call.
    pub fn take_given_up(&mut self) -> Vec<GivenUp> {
        std::mem::take(&mut self.given_up)
    }

    // ----- queries ------------------------------------------------------

    pub fn user_state(&self, user: &str) -> (UserState, usize, Option<&Call>) {
        let Some((_, u)) = self.store.user(user) else {
            return (UserState::Offline, 0, None);
        };
        let call = u.call.and_then(|id| self.store.call(id)).map(|(_, c)| c);
        (state_of(user, u, call), u.devices.len(), call)
    }

    pub fn device(&self, conn: ConnId) -> Option<&DeviceRec> {
        self.store.device(conn).map(|(_, d)| d)
    }

    pub fn calls(&self) -> impl Iterator<Item = &Call> {
        self.store.calls()
    }

    pub fn connection_count(&self) -> usize {
        self.store.device_count()
    }

    /// Live calls by phase: (approving, ringing, talking). O(calls).
    pub fn phase_counts(&self) -> (usize, usize, usize) {
        self.calls().fold((0, 0, 0), |(a, r, t), c| match c.phase {
            Phase::Approving => (a + 1, r, t),
            Phase::Ringing { .. } => (a, r + 1, t),
            Phase::Talking { .. } => (a, r, t + 1),
        })
    }

    /// The store, for tests that drive the rules over it directly.
    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    /// Checks every structural invariant; returns the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        check_invariants(&self.store)
    }
}

/// A user's state from its record and its call's.
pub(crate) fn state_of(user: &str, u: &UserRec, call: Option<&Call>) -> UserState {
    match call {
        None if u.devices.is_empty() => UserState::Offline,
        None => UserState::Idle,
        Some(c) => match c.phase {
            Phase::Talking { .. } => UserState::Talking,
            _ if c.caller.as_ref() == user => UserState::Calling,
            _ => UserState::Ringing,
        },
    }
}

/// Checks every structural invariant of the records in `store`; returns
/// the first one broken.
pub fn check_invariants(store: &MemoryStore) -> Result<(), String> {
    store.check_indexes()?;
    let mut seen_conns = HashSet::new();
    let mut seen_rooms = HashSet::new();
    let user_of = |c: &ConnId| store.device(*c).map(|(_, d)| d.user.clone());
    for call in store.calls() {
        let id = call.id;
        for u in [&call.caller, &call.callee] {
            match store.user(u) {
                Some((_, user)) if user.call == Some(id) => {}
                _ => return Err(format!("user {u} does not point back to call {id}")),
            }
        }
        if call.caller == call.callee {
            return Err(format!("call {id} has one user on both sides"));
        }
        if user_of(&call.caller_conn) != Some(call.caller.clone()) {
            return Err(format!("call {id}: caller device is not the caller's"));
        }
        let mut devices = vec![call.caller_conn];
        match &call.phase {
            Phase::Approving => {}
            Phase::Ringing { ringing, .. } => {
                if ringing.is_empty() {
                    return Err(format!("call {id} rings no device"));
                }
                devices.extend(ringing);
                if ringing
                    .iter()
                    .any(|c| user_of(c) != Some(call.callee.clone()))
                {
                    return Err(format!("call {id} rings a device that is not the callee's"));
                }
            }
            Phase::Talking { callee_conn, room } => {
                if user_of(callee_conn) != Some(call.callee.clone()) {
                    return Err(format!("call {id}: callee device is not the callee's"));
                }
                if !seen_rooms.insert(*room) || *room == 0 {
                    return Err(format!("call {id}: room {room} not unique"));
                }
                devices.push(*callee_conn);
            }
        }
        for d in devices {
            if !seen_conns.insert(d) {
                return Err(format!("device {d:?} takes part in two calls"));
            }
        }
        if store.held(id).is_some() {
            return Err(format!("live call {id} has held notices"));
        }
    }
    for (name, user) in store.users() {
        if let Some(id) = user.call {
            if store.call(id).is_none() {
                return Err(format!("user {name} is held by ended call {id}"));
            }
        } else if user.devices.is_empty() {
            return Err(format!("user {name} is kept with no device and no call"));
        }
        for c in &user.devices {
            if user_of(c).as_ref() != Some(name) {
                return Err(format!("device {c:?} of {name} is not registered to it"));
            }
        }
    }
    for (conn, d) in store.devices() {
        if store
            .user(&d.user)
            .is_none_or(|(_, u)| !u.devices.contains(&conn))
        {
            return Err(format!("device {conn:?} is not among its user's devices"));
        }
    }
    Ok(())
}

/// One input's run of the rules over a transaction's records.
#[derive(Debug)]
pub(crate) struct Step<'t, 'a> {
    pub(crate) t: &'t mut Txn<'a>,
    pub(crate) ring_timeout: Duration,
}

impl Step<'_, '_> {
    // ----- devices ------------------------------------------------------

    pub(crate) fn attach(
        &mut self,
        conn: ConnId,
        user: &UserId,
        node: NodeId,
        token: &Arc<str>,
        max_devices: usize,
        out: &mut Vec<Effect>,
    ) -> Result<(), usize> {
        if self.t.device(&conn).is_some() {
            return Ok(());
        }
        let devices = self.t.user(user).map_or(0, |u| u.devices.len());
        if devices >= max_devices {
            return Err(devices);
        }
        self.t.put_device(
            conn,
            DeviceRec {
                user: user.clone(),
                node,
                epoch: 1,
                attached: true,
                until: None,
                resume_token: token.clone(),
                parked: VecDeque::new(),
            },
        );
        let call_id = match self.t.user_mut(user) {
            Some(u) => {
                u.devices.push(conn);
                u.call
            }
            None => {
                self.t.put_user(
                    user.clone(),
                    UserRec {
                        devices: vec![conn],
                        call: None,
                    },
                );
                None
            }
        };
        let Some(call_id) = call_id else {
            return Ok(());
        };
        let rings = self
            .t
            .call(&call_id)
            .is_some_and(|c| c.callee == *user && matches!(c.phase, Phase::Ringing { .. }));
        if let Some(call) = self.t.call_mut(&call_id).filter(|_| rings)
            && let Phase::Ringing { ringing, .. } = &mut call.phase
        {
            ringing.push(conn);
            out.push(Effect::Send {
                conn,
                event: request_event(call),
            });
        }
        Ok(())
    }

    pub(crate) fn resume(
        &mut self,
        user: &UserId,
        token: &str,
        next: &Arc<str>,
        node: NodeId,
    ) -> Option<(ConnId, u64, VecDeque<Outgoing>)> {
        let conn = self.t.device_by_token(token)?;
        // The token is checked on the record too: the index may be a step
        // behind a resume committed meanwhile.
        if self
            .t
            .device(&conn)
            .is_none_or(|d| d.user != *user || &*d.resume_token != token)
        {
            return None;
        }
        let d = self.t.device_mut(&conn)?;
        d.epoch += 1;
        d.attached = true;
        d.until = None;
        d.node = node;
        d.resume_token = next.clone();
        Some((conn, d.epoch, std::mem::take(&mut d.parked)))
    }

    pub(crate) fn stream_ended(
        &mut self,
        conn: ConnId,
        epoch: u64,
        keep_until: Option<Time>,
        now: Time,
        out: &mut Vec<Effect>,
    ) {
        if self.t.device(&conn).is_none_or(|d| d.epoch != epoch) {
            // A resumed device's old stream, ending late.
            return;
        }
        match keep_until {
            Some(until) => {
                if let Some(d) = self.t.device_mut(&conn) {
                    d.attached = false;
                    d.until = Some(until);
                }
            }
            None => self.drop_device(conn, now, out),
        }
    }

    /// A detached device whose window has passed is given up; whether it
    /// was.
    pub(crate) fn expire(&mut self, conn: ConnId, now: Time, out: &mut Vec<Effect>) -> bool {
        let due = self
            .t
            .device(&conn)
            .is_some_and(|d| d.until.is_some_and(|u| u <= now));
        if due {
            self.drop_device(conn, now, out);
        }
        due
    }

    pub(crate) fn drop_device(&mut self, conn: ConnId, now: Time, out: &mut Vec<Effect>) {
        let Some(user) = self.t.device(&conn).map(|d| d.user.clone()) else {
            return;
        };
        self.t.remove_device(&conn);
        let call_id = match self.t.user_mut(&user) {
            Some(u) => {
                u.devices.retain(|c| *c != conn);
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
        let lost = codes::CONNECTION_LOST;
        let Some(call) = self.t.call(&call_id) else {
            return;
        };
        let needed = call.caller_conn == conn
            || (call.callee == *user
                && match &call.phase {
                    Phase::Approving => false,
                    Phase::Ringing { ringing, .. } => ringing.contains(&conn),
                    Phase::Talking { callee_conn, .. } => *callee_conn == conn,
                });
        if !needed {
            return;
        }
        let Some(call) = self.t.call_mut(&call_id) else {
            return;
        };
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
            Phase::Talking { .. } => {
                out.push(finish_to_caller(call, lost, 0, 0, empty()));
                let mut n = notice(call, EventKind::Finish, lost, Initiator::Service, now);
                n.source = call.callee.clone();
                n.target = call.caller.clone();
                self.end(call_id, vec![n], out);
            }
        }
    }

    // ----- controls -----------------------------------------------------

    pub(crate) fn control(
        &mut self,
        conn: ConnId,
        epoch: Option<u64>,
        ctl: &Control,
        new_call_id: CallId,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Option<Outcome> {
        let device = self.t.device(&conn);
        if let Some(epoch) = epoch
            && device.is_none_or(|d| d.epoch != epoch || !d.attached)
        {
            // From a stream that lost the device to a resume (or a device
            // already gone): it acts on nothing.
            return None;
        }
        let Some(user) = device.map(|d| d.user.clone()) else {
            return Some(Outcome::refused(codes::NOT_IN_CALL, "unknown connection"));
        };
        if ctl.peer == user {
            return Some(Outcome::refused(
                codes::INVALID_ARGUMENT,
                "the peer is the sender itself",
            ));
        }
        if ctl.peer.is_empty() {
            return Some(Outcome::refused(
                codes::INVALID_ARGUMENT,
                "empty peer user id",
            ));
        }
        Some(match ctl.kind {
            ControlKind::Request => self.request(conn, user, ctl, new_call_id, now, out),
            ControlKind::Reply | ControlKind::Finish => self.answer(conn, user, ctl, now, out),
        })
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
        if let Some(current) = self.t.user(&caller).and_then(|u| u.call) {
            // This very REQUEST, placed already: a shared store retries a
            // commit whose reply a dropped connection lost, and the retry
            // finds its own call. Placed is what its sender is told.
            if current == call_id && self.t.call(&current).is_some_and(|c| c.caller_conn == conn) {
                return Outcome::ok(call_id);
            }
            // Glare: the sender is being called by the very peer it dials,
            // and the call has not started. However the two REQUESTs crossed,
            // this one gets REPLY 100103 (below) and the other call goes on.
            let glare = self.t.call(&current).is_some_and(|c| {
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
        let refusal = match self.t.user(&callee) {
            None => Some(codes::OFFLINE),
            Some(u) if u.devices.is_empty() => Some(codes::OFFLINE),
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
        self.t.put_call(call_id, call);
        Outcome::ok(call_id)
    }

    fn reserve(&mut self, user: &UserId, call_id: CallId) {
        match self.t.user_mut(user) {
            Some(u) => u.call = Some(call_id),
            None => self.t.put_user(
                user.clone(),
                UserRec {
                    devices: Vec::new(),
                    call: Some(call_id),
                },
            ),
        }
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
    fn party(
        &mut self,
        conn: ConnId,
        user: &UserId,
        peer: &UserId,
    ) -> Option<(CallId, bool, bool)> {
        let call_id = self.t.user(user).and_then(|u| u.call)?;
        let call = self.t.call(&call_id)?;
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
        let Some(call) = self.t.call_mut(&call_id) else {
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
        let Some(call) = self.t.call_mut(&call_id) else {
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
        let room = self.t.allocate_room();
        let Some(call) = self.t.call_mut(&call_id) else {
            return Outcome::ok(call_id);
        };
        let Phase::Ringing { ringing, .. } = &call.phase else {
            return Outcome::ok(call_id);
        };
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
        let Some(call) = self.t.call_mut(&call_id) else {
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

    /// The business service ends a user's call (forced FINISH).
    pub(crate) fn force_finish(
        &mut self,
        f: &ForceFinish,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Outcome {
        let Some(call_id) = self.t.user(&f.user).and_then(|u| u.call) else {
            return Outcome::refused(codes::NOT_IN_CALL, "the user has no call");
        };
        if f.only.is_some_and(|c| c != call_id) {
            return Outcome::refused(codes::NOT_IN_CALL, "the user's call is another call");
        }
        let Some(call) = self.t.call_mut(&call_id) else {
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

    /// The business service's verdict (or the failure policy's) on a call's
    /// REQUEST.
    pub(crate) fn approval_done(
        &mut self,
        call_id: CallId,
        verdict: Verdict,
        now: Time,
        out: &mut Vec<Effect>,
    ) {
        if let Some(notices) = self.t.held(&call_id).cloned() {
            self.t.remove_held(&call_id);
            out.extend(notices.into_iter().map(Effect::Notify));
            return;
        }
        let Some(call) = self.t.call(&call_id) else {
            return;
        };
        if call.phase != Phase::Approving {
            return;
        }
        let callee = call.callee.clone();
        let (code, initiator) = match verdict {
            Verdict::Refuse { code, initiator } if code != codes::OK => (code, initiator),
            _ => {
                let conns = self
                    .t
                    .user(&callee)
                    .map(|u| u.devices.clone())
                    .unwrap_or_default();
                if conns.is_empty() {
                    // Every device of the callee left during the approval.
                    (codes::OFFLINE, Initiator::Service)
                } else {
                    let deadline = now + self.ring_timeout;
                    let Some(call) = self.t.call_mut(&call_id) else {
                        return;
                    };
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
                    return;
                }
            }
        };
        let Some(call) = self.t.call_mut(&call_id) else {
            return;
        };
        out.push(reply_to_caller(call, code, 0, 0, empty()));
        let n = notice(call, EventKind::Reply, code, initiator, now);
        // The verdict is in: nothing to park.
        self.end_call(call_id, vec![n], false, out);
    }

    /// A call ringing past its deadline ends with 100105.
    pub(crate) fn ring_out(&mut self, call_id: CallId, now: Time, out: &mut Vec<Effect>) {
        let due = self
            .t
            .call(&call_id)
            .is_some_and(|c| matches!(c.phase, Phase::Ringing { deadline, .. } if deadline <= now));
        if !due {
            return;
        }
        let Some(call) = self.t.call_mut(&call_id) else {
            return;
        };
        let Phase::Ringing { ringing, .. } = &call.phase else {
            return;
        };
        let code = codes::NO_ANSWER;
        out.push(reply_to_caller(call, code, 0, 0, empty()));
        for &c in ringing {
            out.push(finish_to_callee(call, c, code, 0, 0, empty()));
        }
        let n = notice(call, EventKind::Reply, code, Initiator::Service, now);
        self.end(call_id, vec![n], out);
    }

    // ----- internals ----------------------------------------------------

    /// Ends a call: frees both users and the room at once, and emits (or,
    /// while its approval is out, holds) the call's last notices.
    fn end(&mut self, call_id: CallId, notices: Vec<Notice>, out: &mut Vec<Effect>) {
        self.end_call(call_id, notices, true, out);
    }

    /// [`Step::end`]; `approval_out` is false when the verdict of an
    /// approving call has just come in.
    fn end_call(
        &mut self,
        call_id: CallId,
        notices: Vec<Notice>,
        approval_out: bool,
        out: &mut Vec<Effect>,
    ) {
        let Some(call) = self.t.call(&call_id) else {
            return;
        };
        let approving = call.phase == Phase::Approving;
        let users = [call.caller.clone(), call.callee.clone()];
        // The store clears the ring timer and frees the room with it.
        self.t.remove_call(&call_id);
        if approving && approval_out {
            self.t.put_held(call_id, notices);
        } else {
            out.extend(notices.into_iter().map(Effect::Notify));
        }
        for user in &users {
            if self.t.user(user).is_some_and(|u| u.call == Some(call_id))
                && let Some(u) = self.t.user_mut(user)
            {
                u.call = None;
            }
            self.forget_if_unused(user);
        }
    }

    fn forget_if_unused(&mut self, user: &UserId) {
        if self
            .t
            .user(user)
            .is_some_and(|u| u.devices.is_empty() && u.call.is_none())
        {
            self.t.remove_user(user);
        }
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
