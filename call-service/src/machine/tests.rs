//! Tests of the state machine: a few fixed scenarios, then model-based
//! property tests over random interleavings of every input.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::store::{Conflict, Transition, Version};
use uuid::Uuid;

const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];
/// Two devices per user: device `i` belongs to `USERS[i % 4]`.
const DEVICES: u64 = 8;
const RING: Duration = Duration::from_secs(30);

fn user_of(conn: u64) -> UserId {
    Arc::from(USERS[(conn % 4) as usize])
}

fn ctl(kind: ControlKind, peer: &str, code: u32) -> Control {
    Control {
        kind,
        peer: Arc::from(peer),
        code,
        flags: 3,
        param: 7,
        user_str: Arc::from("hi"),
    }
}

fn sends(out: &[Effect]) -> Vec<(u64, EventKind, u32)> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Send { conn, event } => Some((conn.0, event.kind, event.code)),
            _ => None,
        })
        .collect()
}

fn machine() -> Machine {
    Machine::new(MachineConfig { ring_timeout: RING })
}

fn id(n: u128) -> CallId {
    CallId(Uuid::from_u128(n))
}

#[test]
fn full_call_then_hang_up() {
    let mut m = machine();
    let mut out = vec![];
    m.connect(ConnId(0), user_of(0), &mut out);
    m.connect(ConnId(1), user_of(1), &mut out);
    let t = Duration::ZERO;
    let o = m.control(
        ConnId(0),
        &ctl(ControlKind::Request, "u1", 0),
        id(1),
        t,
        &mut out,
    );
    assert_eq!(o.code, 0);
    assert!(matches!(out.as_slice(), [Effect::Approve(n)] if n.decision_required && n.seq == 1));
    assert_eq!(m.user_state("u1").0, UserState::Ringing);
    out.clear();
    m.approval_done(id(1), Verdict::Allow, t, &mut out);
    assert_eq!(sends(&out), vec![(1, EventKind::Request, 0)]);
    out.clear();
    let o = m.control(
        ConnId(1),
        &ctl(ControlKind::Reply, "u0", 0),
        id(2),
        t,
        &mut out,
    );
    assert_eq!(o.code, 0);
    assert_eq!(
        sends(&out),
        vec![
            (0, EventKind::Reply, 0),
            (0, EventKind::Start, 0),
            (1, EventKind::Start, 0)
        ]
    );
    assert_eq!(m.user_state("u0").0, UserState::Talking);
    out.clear();
    let o = m.control(
        ConnId(1),
        &ctl(ControlKind::Finish, "u0", 0),
        id(3),
        t,
        &mut out,
    );
    assert_eq!(o.code, 0);
    assert_eq!(
        sends(&out),
        vec![(0, EventKind::Finish, 0), (1, EventKind::Finish, 0)]
    );
    assert_eq!(m.user_state("u0").0, UserState::Idle);
    assert_eq!(m.user_state("u1").0, UserState::Idle);
    m.check_invariants().unwrap();
}

/// A REQUEST repeated with its call id by the device that placed it (a
/// shared store's retry of a commit that ran) is answered as placed and
/// changes nothing; another device of the same user with that id is still
/// refused.
#[test]
fn a_request_repeated_with_its_call_id_changes_nothing() {
    let mut m = machine();
    let mut out = vec![];
    m.connect(ConnId(0), user_of(0), &mut out);
    m.connect(ConnId(4), user_of(4), &mut out);
    m.connect(ConnId(1), user_of(1), &mut out);
    let req = ctl(ControlKind::Request, "u1", 0);
    out.clear();
    assert_eq!(
        m.control(ConnId(0), &req, id(1), Duration::ZERO, &mut out)
            .code,
        0
    );
    out.clear();
    let again = m.control(ConnId(0), &req, id(1), Duration::ZERO, &mut out);
    assert_eq!((again.code, again.call_id), (0, Some(id(1))));
    assert!(out.is_empty(), "{out:?}");
    let other = m.control(ConnId(4), &req, id(1), Duration::ZERO, &mut out);
    assert_eq!(other.code, codes::ALREADY_IN_CALL);
    assert_eq!(m.user_state("u1").0, UserState::Ringing);
}

#[test]
fn glare_gives_one_call_and_one_busy() {
    let mut m = machine();
    let mut out = vec![];
    m.connect(ConnId(0), user_of(0), &mut out);
    m.connect(ConnId(1), user_of(1), &mut out);
    let t = Duration::ZERO;
    assert_eq!(
        m.control(
            ConnId(0),
            &ctl(ControlKind::Request, "u1", 0),
            id(1),
            t,
            &mut out
        )
        .code,
        0
    );
    out.clear();
    // u1's REQUEST crosses u0's: u0 is busy calling u1, so u1 hears REPLY
    // 100103 and u0's call goes on, whether or not it already rings.
    let o = m.control(
        ConnId(1),
        &ctl(ControlKind::Request, "u0", 0),
        id(2),
        t,
        &mut out,
    );
    assert_eq!(o.code, 0);
    assert_eq!(sends(&out), vec![(1, EventKind::Reply, codes::BUSY)]);
    m.approval_done(id(1), Verdict::Allow, t, &mut out);
    out.clear();
    let o = m.control(
        ConnId(1),
        &ctl(ControlKind::Request, "u0", 0),
        id(3),
        t,
        &mut out,
    );
    assert_eq!(sends(&out), vec![(1, EventKind::Reply, codes::BUSY)]);
    assert_eq!(o.code, 0);
    // A third party is no glare: u1 already has a call.
    m.connect(ConnId(2), user_of(2), &mut out);
    let o = m.control(
        ConnId(1),
        &ctl(ControlKind::Request, "u2", 0),
        id(4),
        t,
        &mut out,
    );
    assert_eq!(o.code, codes::ALREADY_IN_CALL);
    assert_eq!(m.calls().count(), 1);
}

#[test]
fn offline_and_busy_answer_with_reply() {
    let mut m = machine();
    let mut out = vec![];
    for c in 0..3 {
        m.connect(ConnId(c), user_of(c), &mut out);
    }
    let t = Duration::ZERO;
    let o = m.control(
        ConnId(0),
        &ctl(ControlKind::Request, "u3", 0),
        id(1),
        t,
        &mut out,
    );
    assert_eq!(o.code, 0);
    assert_eq!(sends(&out), vec![(0, EventKind::Reply, codes::OFFLINE)]);
    assert_eq!(m.user_state("u0").0, UserState::Idle);
    out.clear();
    m.control(
        ConnId(0),
        &ctl(ControlKind::Request, "u1", 0),
        id(2),
        t,
        &mut out,
    );
    out.clear();
    m.control(
        ConnId(2),
        &ctl(ControlKind::Request, "u1", 0),
        id(3),
        t,
        &mut out,
    );
    assert_eq!(sends(&out), vec![(2, EventKind::Reply, codes::BUSY)]);
}

#[test]
fn multi_device_first_answer_wins() {
    let mut m = machine();
    let mut out = vec![];
    m.connect(ConnId(0), user_of(0), &mut out);
    m.connect(ConnId(1), user_of(1), &mut out);
    m.connect(ConnId(5), user_of(5), &mut out);
    let t = Duration::ZERO;
    m.control(
        ConnId(0),
        &ctl(ControlKind::Request, "u1", 0),
        id(1),
        t,
        &mut out,
    );
    m.approval_done(id(1), Verdict::Allow, t, &mut out);
    out.clear();
    m.control(
        ConnId(5),
        &ctl(ControlKind::Reply, "u0", 0),
        id(9),
        t,
        &mut out,
    );
    assert!(sends(&out).contains(&(1, EventKind::Finish, codes::ANSWERED_ELSEWHERE)));
    assert!(sends(&out).contains(&(5, EventKind::Start, 0)));
    out.clear();
    // The losing device's late answer matches no call of that device.
    let o = m.control(
        ConnId(1),
        &ctl(ControlKind::Reply, "u0", 0),
        id(9),
        t,
        &mut out,
    );
    assert_eq!(o.code, codes::NOT_IN_CALL);
    assert!(out.is_empty());
}

#[test]
fn ring_timeout_and_forced_finish() {
    let mut m = machine();
    let mut out = vec![];
    m.connect(ConnId(0), user_of(0), &mut out);
    m.connect(ConnId(1), user_of(1), &mut out);
    m.control(
        ConnId(0),
        &ctl(ControlKind::Request, "u1", 0),
        id(1),
        Duration::ZERO,
        &mut out,
    );
    m.approval_done(id(1), Verdict::Allow, Duration::ZERO, &mut out);
    out.clear();
    m.tick(RING - Duration::from_millis(1), &mut out);
    assert!(out.is_empty());
    m.tick(RING, &mut out);
    assert_eq!(
        sends(&out),
        vec![
            (0, EventKind::Reply, codes::NO_ANSWER),
            (1, EventKind::Finish, codes::NO_ANSWER)
        ]
    );
    assert_eq!(m.next_deadline(), None);
    out.clear();
    m.control(
        ConnId(0),
        &ctl(ControlKind::Request, "u1", 0),
        id(2),
        RING,
        &mut out,
    );
    out.clear();
    // Forced with 0 before START: not a REPLY 0.
    let f = ForceFinish {
        user: Arc::from("u1"),
        only: None,
        code: 0,
        flags: 0,
        param: 0,
        user_str: Arc::from("bye"),
    };
    // Naming another call changes nothing.
    let other = ForceFinish {
        only: Some(id(99)),
        ..f.clone()
    };
    assert_eq!(
        m.force_finish(&other, RING, &mut out).code,
        codes::NOT_IN_CALL
    );
    assert!(out.is_empty());
    let o = m.force_finish(
        &ForceFinish {
            only: Some(id(2)),
            ..f
        },
        RING,
        &mut out,
    );
    assert_eq!(o.code, 0);
    assert_eq!(sends(&out), vec![(0, EventKind::Reply, codes::TERMINATED)]);
    // The call ended during its approval: its notices wait for the verdict.
    assert!(!out.iter().any(|e| matches!(e, Effect::Notify(_))));
    out.clear();
    m.approval_done(id(2), Verdict::Allow, RING, &mut out);
    assert!(
        matches!(out.as_slice(), [Effect::Notify(n)] if n.kind == EventKind::Reply && n.seq == 2)
    );
}

// ----- model-based property tests ---------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Connect(u64),
    Disconnect(u64),
    Control {
        conn: u64,
        kind: ControlKind,
        peer: usize,
        code: u32,
    },
    Approve {
        pick: usize,
        verdict: Option<u32>,
    },
    Advance(u64),
    Force {
        user: usize,
        code: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let code = prop_oneof![
        Just(0u32),
        Just(codes::CANCELLED),
        Just(codes::REJECTED),
        Just(777_777u32)
    ];
    let kind = prop_oneof![
        Just(ControlKind::Request),
        Just(ControlKind::Reply),
        Just(ControlKind::Finish)
    ];
    prop_oneof![
        2 => (0..DEVICES).prop_map(Op::Connect),
        1 => (0..DEVICES).prop_map(Op::Disconnect),
        6 => (0..DEVICES, kind, 0..USERS.len(), code.clone())
            .prop_map(|(conn, kind, peer, code)| Op::Control { conn, kind, peer, code }),
        3 => (any::<usize>(), prop::option::of(code.clone()))
            .prop_map(|(pick, verdict)| Op::Approve { pick, verdict }),
        2 => prop_oneof![Just(1_000u64), Just(29_000), Just(31_000)].prop_map(Op::Advance),
        1 => (0..USERS.len(), code).prop_map(|(user, code)| Op::Force { user, code }),
    ]
}

/// What each device has seen of each call, checked against the contract's
/// lines as events arrive.
/// Events one device saw of one call: (kind, code, param).
type Line = Vec<(EventKind, u32, u32)>;

#[derive(Default)]
struct Model {
    connected: HashSet<u64>,
    /// (device, call) -> events seen, in order.
    lines: HashMap<(u64, CallId), Line>,
    /// call -> notices seen, in order.
    notices: HashMap<CallId, Vec<Notice>>,
    approvals: Vec<CallId>,
    rooms: HashMap<CallId, u32>,
}

impl Model {
    fn absorb(&mut self, m: &Machine, out: &[Effect]) -> Result<(), String> {
        self.absorb_store(m.store(), out)
    }

    fn absorb_store(&mut self, m: &MemoryStore, out: &[Effect]) -> Result<(), String> {
        for e in out {
            match e {
                Effect::Send { conn, event } => {
                    if !self.connected.contains(&conn.0) {
                        return Err(format!("event sent to a gone device {conn:?}"));
                    }
                    let me = user_of(conn.0);
                    if event.peer == me {
                        return Err("an event names the receiver as its own peer".into());
                    }
                    let line = self.lines.entry((conn.0, event.call_id)).or_default();
                    line.push((event.kind, event.code, event.param));
                    check_line(line)?;
                    if event.kind == EventKind::Start {
                        let room = *self.rooms.entry(event.call_id).or_insert(event.param);
                        if room != event.param || room == 0 {
                            return Err("the two STARTs of a call differ in room".into());
                        }
                    }
                }
                Effect::Approve(n) => {
                    self.approvals.push(n.call_id);
                    self.push_notice(n)?;
                }
                Effect::Notify(n) => self.push_notice(n)?,
            }
        }
        // Every unfinished line belongs to a live call the device is in.
        for ((conn, call_id), line) in &self.lines {
            if !self.connected.contains(conn) || line_done(line) {
                continue;
            }
            let Some(call) = m.calls().find(|c| c.id == *call_id) else {
                return Err(format!(
                    "device {conn} was left in ended call {call_id}: {line:?}"
                ));
            };
            let inside = call.caller_conn.0 == *conn
                || match &call.phase {
                    Phase::Approving => false,
                    Phase::Ringing { ringing, .. } => ringing.contains(&ConnId(*conn)),
                    Phase::Talking { callee_conn, .. } => callee_conn.0 == *conn,
                };
            if !inside {
                return Err(format!(
                    "device {conn} dropped from call {call_id} without FINISH"
                ));
            }
        }
        // Every live call's devices have heard what its phase says.
        for call in m.calls() {
            let caller_line = self
                .lines
                .get(&(call.caller_conn.0, call.id))
                .map(Vec::len)
                .unwrap_or(0);
            let (caller_want, callee) = match &call.phase {
                Phase::Approving => (0, vec![]),
                Phase::Ringing { ringing, .. } => (0, ringing.iter().map(|c| (c.0, 1)).collect()),
                Phase::Talking { callee_conn, .. } => (2, vec![(callee_conn.0, 2)]),
            };
            if caller_line != caller_want {
                return Err(format!("caller of {} saw {caller_line} events", call.id));
            }
            for (c, want) in callee {
                let got = self.lines.get(&(c, call.id)).map(Vec::len).unwrap_or(0);
                if got != want {
                    return Err(format!("callee device {c} of {} saw {got} events", call.id));
                }
            }
        }
        Ok(())
    }

    fn push_notice(&mut self, n: &Notice) -> Result<(), String> {
        let seen = self.notices.entry(n.call_id).or_default();
        if n.seq as usize != seen.len() + 1 {
            return Err(format!("notice seq {} after {} notices", n.seq, seen.len()));
        }
        let kinds: Vec<_> = seen.iter().map(|n| (n.kind, n.code)).collect();
        let ok = matches!(
            (kinds.as_slice(), n.kind),
            ([], EventKind::Request)
                | ([(EventKind::Request, _)], EventKind::Reply)
                | ([_, (EventKind::Reply, 0)], EventKind::Start)
                | ([_, _, (EventKind::Start, _)], EventKind::Finish)
        );
        if !ok {
            return Err(format!("notice {:?} after {kinds:?}", n.kind));
        }
        seen.push(n.clone());
        Ok(())
    }
}

/// Caller: REPLY, then only if 0: START, FINISH. Callee: REQUEST, then START
/// then FINISH, or FINISH.
fn check_line(line: &[(EventKind, u32, u32)]) -> Result<(), String> {
    use EventKind::*;
    let kinds: Vec<_> = line.iter().map(|(k, c, _)| (*k, *c)).collect();
    let ok = matches!(
        kinds.as_slice(),
        [(Reply, _)]
            | [(Request, _)]
            | [(Reply, 0), (Start, _)]
            | [(Reply, 0), (Start, _), (Finish, _)]
            | [(Request, _), (Start, _)]
            | [(Request, _), (Start, _), (Finish, _)]
            | [(Request, _), (Finish, _)]
    );
    if ok {
        Ok(())
    } else {
        Err(format!("events break the contract's line: {kinds:?}"))
    }
}

fn line_done(line: &[(EventKind, u32, u32)]) -> bool {
    matches!(
        line.last(),
        Some((EventKind::Finish, _, _)) | Some((EventKind::Reply, 1.., _))
    )
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut m = machine();
    let mut model = Model::default();
    let mut now = Duration::ZERO;
    let mut next_id = 0u128;
    let mut out = Vec::new();
    for op in ops {
        out.clear();
        match op {
            Op::Connect(c) => {
                if model.connected.insert(c) {
                    m.connect(ConnId(c), user_of(c), &mut out);
                }
            }
            Op::Disconnect(c) => {
                model.connected.remove(&c);
                // Device ids come back in this model; the device's old lines go.
                model.lines.retain(|(conn, _), _| *conn != c);
                m.disconnect(ConnId(c), now, &mut out);
            }
            Op::Control {
                conn,
                kind,
                peer,
                code,
            } => {
                if !model.connected.contains(&conn) {
                    continue;
                }
                next_id += 1;
                let c = ctl(kind, USERS[peer], code);
                let before = (m.calls().count(), m.connection_count());
                let o = m.control(ConnId(conn), &c, id(next_id), now, &mut out);
                if o.code != 0 {
                    prop_assert!(out.is_empty(), "refused control {c:?} had effects {out:?}");
                    prop_assert_eq!(before, (m.calls().count(), m.connection_count()));
                }
            }
            Op::Approve { pick, verdict } => {
                if model.approvals.is_empty() {
                    continue;
                }
                let call_id = model.approvals.remove(pick % model.approvals.len());
                let v = match verdict {
                    None | Some(0) => Verdict::Allow,
                    Some(code) => Verdict::Refuse {
                        code,
                        initiator: Initiator::Business,
                    },
                };
                m.approval_done(call_id, v, now, &mut out);
            }
            Op::Advance(ms) => {
                now += Duration::from_millis(ms);
                m.tick(now, &mut out);
            }
            Op::Force { user, code } => {
                let f = ForceFinish {
                    user: Arc::from(USERS[user]),
                    only: None,
                    code,
                    flags: 0,
                    param: 0,
                    user_str: Arc::from(""),
                };
                m.force_finish(&f, now, &mut out);
            }
        }
        m.check_invariants().map_err(TestCaseError::fail)?;
        model.absorb(&m, &out).map_err(TestCaseError::fail)?;
        // A user is busy exactly when a live call names it.
        for u in USERS {
            let in_call = m
                .calls()
                .any(|c| c.caller.as_ref() == u || c.callee.as_ref() == u);
            let busy = !matches!(m.user_state(u).0, UserState::Idle | UserState::Offline);
            prop_assert_eq!(in_call, busy);
        }
    }
    // Settle: every approval answered, every ring timed out. Then every call
    // has ended and every notice line is complete.
    out.clear();
    for call_id in std::mem::take(&mut model.approvals) {
        m.approval_done(call_id, Verdict::Allow, now, &mut out);
    }
    model.absorb(&m, &out).map_err(TestCaseError::fail)?;
    out.clear();
    now += RING * 2;
    m.tick(now, &mut out);
    model.absorb(&m, &out).map_err(TestCaseError::fail)?;
    let mut devices: Vec<u64> = model.connected.iter().copied().collect();
    devices.sort_unstable();
    for c in devices {
        out.clear();
        model.connected.remove(&c);
        model.lines.retain(|(conn, _), _| *conn != c);
        m.disconnect(ConnId(c), now, &mut out);
        model.absorb(&m, &out).map_err(TestCaseError::fail)?;
    }
    m.check_invariants().map_err(TestCaseError::fail)?;
    prop_assert_eq!(m.calls().count(), 0);
    for (call_id, notices) in &model.notices {
        let last = notices.last().map(|n| (n.kind, n.code));
        let complete = matches!(
            last,
            Some((EventKind::Finish, _)) | Some((EventKind::Reply, 1..))
        );
        prop_assert!(complete, "call {} notices end with {:?}", call_id, last);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_the_contract(ops in prop::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}

#[test]
fn a_call_id_as_text_is_what_display_writes() {
    for _ in 0..100 {
        let id = CallId(uuid::Uuid::new_v4());
        assert_eq!(id.text(), id.to_string());
    }
}

// ----- transitions that race --------------------------------------------
//
// Several nodes run the rules at once over one shared store: two inputs can
// load the same versions, and only the first commit wins; the other is run
// again from fresh records. The test below does exactly that over the
// in-memory store: each step prepares two transitions from the same
// records, commits them in a random order, and reruns the loser. After
// every commit the invariants hold, versions never go back, and each
// device's events (as the rules emitted them: delivered, or parked for a
// resume) follow the contract's lines.

/// What the race test does to the store; device ids as in [`Op`].
#[derive(Clone, Debug)]
enum Race {
    Op(Op),
    /// The device's stream breaks: detached, kept for the grace window.
    Lose(u64),
    /// A new stream resumes the device with its current token.
    Resume(u64),
    /// A timer the store holds has come due (not generated: time passes
    /// with `Op::Advance`, and every timer due runs, in order).
    Due(Timer),
}

fn race() -> impl Strategy<Value = Race> {
    prop_oneof![
        8 => op().prop_map(Race::Op),
        1 => (0..DEVICES).prop_map(Race::Lose),
        1 => (0..DEVICES).prop_map(Race::Resume),
    ]
}

const GRACE: Duration = Duration::from_secs(10);

/// What one input does, as a rule over `s`. Inputs that are not a
/// transition of their own (the passing of time) are `None`.
fn race_rule(
    s: &mut Step<'_, '_>,
    race: &Race,
    call_id: CallId,
    model: &Model,
    tokens: &HashMap<u64, Arc<str>>,
    now: Time,
    out: &mut Vec<Effect>,
) -> Option<()> {
    match race {
        Race::Op(Op::Connect(c)) => {
            let token = tokens.get(c).cloned().unwrap_or_else(|| token_of(*c, 0));
            let _ = s.attach(ConnId(*c), &user_of(*c), NodeId(1), &token, usize::MAX, out);
        }
        Race::Op(Op::Disconnect(c)) => s.drop_device(ConnId(*c), now, out),
        Race::Op(Op::Control {
            conn,
            kind,
            peer,
            code,
        }) => {
            let c = ctl(*kind, USERS[*peer], *code);
            let o = s.control(ConnId(*conn), None, &c, call_id, now, out)?;
            if o.code != 0 && !out.is_empty() {
                panic!("refused control {c:?} had effects {out:?}");
            }
        }
        Race::Op(Op::Approve { pick, verdict }) => {
            let call_id = *model.approvals.get(pick % model.approvals.len().max(1))?;
            let v = match verdict {
                None | Some(0) => Verdict::Allow,
                Some(code) => Verdict::Refuse {
                    code: *code,
                    initiator: Initiator::Business,
                },
            };
            s.approval_done(call_id, v, now, out);
        }
        Race::Op(Op::Force { user, code }) => {
            let f = ForceFinish {
                user: Arc::from(USERS[*user]),
                only: None,
                code: *code,
                flags: 0,
                param: 0,
                user_str: Arc::from(""),
            };
            s.force_finish(&f, now, out);
        }
        Race::Op(Op::Advance(_)) => return None,
        Race::Due(Timer::Ring(call_id)) => s.ring_out(*call_id, now, out),
        Race::Due(Timer::Grace(conn)) => {
            s.expire(*conn, now, out);
        }
        Race::Lose(c) => {
            let epoch = s.t.device(&ConnId(*c))?.epoch;
            s.stream_ended(ConnId(*c), epoch, Some(now + GRACE), now, out);
        }
        Race::Resume(c) => {
            let token = tokens.get(c)?.clone();
            // Unique: no two steps share a call id.
            let next = token_of(*c, call_id.0.as_u128() as u64);
            s.resume(&user_of(*c), &token, &next, NodeId(1))?;
        }
    }
    Some(())
}

fn token_of(conn: u64, n: u64) -> Arc<str> {
    Arc::from(format!("{conn}-{n}"))
}

/// A prepared transition: the rule's effects as it emitted them.
type Prepared = (Transition, Vec<Effect>);

fn prepare(
    store: &MemoryStore,
    race: &Race,
    call_id: CallId,
    model: &Model,
    tokens: &HashMap<u64, Arc<str>>,
    now: Time,
) -> Option<Prepared> {
    let mut txn = Txn::new(store);
    let mut out = Vec::new();
    let mut s = Step {
        t: &mut txn,
        ring_timeout: RING,
    };
    race_rule(&mut s, race, call_id, model, tokens, now, &mut out)?;
    Some((txn.finish(), out))
}

/// What the race test keeps beside the [`Model`]: each device's current
/// resume token, the versions last seen, and how often a commit lost.
#[derive(Default)]
struct RaceState {
    tokens: HashMap<u64, Arc<str>>,
    versions: HashMap<String, Version>,
    conflicts: usize,
}

impl RaceState {
    /// After a commit: the model learns what happened, everything is
    /// checked.
    fn committed(
        &mut self,
        store: &MemoryStore,
        model: &mut Model,
        race: &Race,
        effects: &[Effect],
    ) -> Result<(), String> {
        match race {
            Race::Op(Op::Connect(c)) => {
                model.connected.insert(*c);
            }
            Race::Op(Op::Disconnect(c)) => {
                model.connected.remove(c);
                model.lines.retain(|(conn, _), _| conn != c);
            }
            _ => {}
        }
        // Tokens and membership as the store has them now.
        for c in 0..DEVICES {
            match store.device(ConnId(c)) {
                Some((_, d)) => {
                    self.tokens.insert(c, d.resume_token.clone());
                }
                None => {
                    self.tokens.remove(&c);
                    if model.connected.remove(&c) {
                        model.lines.retain(|(conn, _), _| *conn != c);
                    }
                }
            }
        }
        model.approvals.retain(|id| {
            store
                .call(*id)
                .is_some_and(|(_, c)| c.phase == Phase::Approving)
                || store.held(*id).is_some()
        });
        check_invariants(store)?;
        for (key, v) in store.versions() {
            let before = self.versions.insert(key.clone(), v).unwrap_or(0);
            if v < before {
                return Err(format!("{key} went back from version {before} to {v}"));
            }
        }
        model.absorb_store(store, effects)
    }
}

#[derive(Debug, Default)]
struct RaceStats {
    commits: usize,
    conflicts: usize,
}

fn run_races(steps: Vec<(Race, Race, bool)>) -> Result<RaceStats, TestCaseError> {
    let mut store = MemoryStore::new();
    let mut model = Model::default();
    let mut state = RaceState::default();
    let mut now = Duration::ZERO;
    let mut next_id = 0u128;
    let mut commits = 0;
    for (a, b, swap) in steps {
        for r in [&a, &b] {
            if let Race::Op(Op::Advance(ms)) = r {
                // As `Machine::tick`, keeping each rule's own effects.
                now += Duration::from_millis(*ms);
                for timer in store.due(now) {
                    let due = Race::Due(timer);
                    let prepared = prepare(&store, &due, id(0), &model, &state.tokens, now);
                    if let Some((t, effects)) = prepared {
                        store
                            .commit(&mut t.clone(), &mut effects.clone(), 0)
                            .map_err(|_| TestCaseError::fail("a timer's transition conflicted"))?;
                        state
                            .committed(&store, &mut model, &due, &effects)
                            .map_err(TestCaseError::fail)?;
                    }
                }
            }
        }
        next_id += 2;
        let (ida, idb) = (id(next_id - 1), id(next_id));
        let pa = prepare(&store, &a, ida, &model, &state.tokens, now);
        let pb = prepare(&store, &b, idb, &model, &state.tokens, now);
        let mut order = vec![(&a, ida, pa), (&b, idb, pb)];
        if swap {
            order.reverse();
        }
        for (race, call_id, prepared) in order {
            let Some((t, effects)) = prepared else {
                continue;
            };
            commits += 1;
            let effects = match store.commit(&mut t.clone(), &mut effects.clone(), 0) {
                Ok(_) => effects,
                Err(Conflict) => {
                    // Lost the race: run again from fresh records, as
                    // `store::transact` does.
                    state.conflicts += 1;
                    let Some((t, effects)) =
                        prepare(&store, race, call_id, &model, &state.tokens, now)
                    else {
                        continue;
                    };
                    store
                        .commit(&mut t.clone(), &mut effects.clone(), 0)
                        .map_err(|_| TestCaseError::fail("a fresh transition conflicted"))?;
                    effects
                }
            };
            state
                .committed(&store, &mut model, race, &effects)
                .map_err(TestCaseError::fail)?;
        }
    }
    Ok(RaceStats {
        commits,
        conflicts: state.conflicts,
    })
}

/// Races at least 900,000 random inputs (8,000 runs of up to 240), and
/// checks that commits did lose races: more than one in a hundred (most
/// inputs are refusals that write nothing, so cannot make another lose).
#[test]
fn racing_transitions_keep_the_contract() {
    use proptest::test_runner::TestRunner;
    use std::cell::Cell;
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 8_000,
        ..ProptestConfig::default()
    });
    let strategy = prop::collection::vec((race(), race(), any::<bool>()), 1..120);
    let (inputs, commits, conflicts) = (Cell::new(0), Cell::new(0), Cell::new(0));
    let result = runner.run(&strategy, |steps| {
        inputs.set(inputs.get() + 2 * steps.len());
        let stats = run_races(steps)?;
        commits.set(commits.get() + stats.commits);
        conflicts.set(conflicts.get() + stats.conflicts);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!(
        "raced {} inputs: {} commits, {} lost a race and ran again",
        inputs.get(),
        commits.get(),
        conflicts.get()
    );
    assert!(inputs.get() >= 900_000, "only {} inputs", inputs.get());
    assert!(
        conflicts.get() * 100 > commits.get(),
        "{} conflicts in {} commits",
        conflicts.get(),
        commits.get()
    );
}

/// A detached device that parks more than it may is given up in the same
/// input, and the call it rang ends at that input's time (100106).
#[test]
fn a_detached_device_that_parks_too_much_is_given_up_at_once() {
    let mut m = machine();
    let mut out = vec![];
    m.connect(ConnId(0), user_of(0), &mut out);
    m.connect(ConnId(1), user_of(1), &mut out);
    let t = Duration::from_secs(100);
    let epoch = m.device(ConnId(0)).unwrap().epoch;
    m.stream_ended(ConnId(0), epoch, Some(t + GRACE), t, &mut out);
    let mut n = 0;
    let call = |m: &mut Machine, out: &mut Vec<Effect>, n: &mut u128| {
        *n += 1;
        m.control(
            ConnId(1),
            &ctl(ControlKind::Request, "u0", 0),
            id(*n),
            t,
            out,
        );
        m.approval_done(id(*n), Verdict::Allow, t, out);
    };
    for _ in 0..store::PARK_LIMIT / 2 {
        call(&mut m, &mut out, &mut n);
        m.control(
            ConnId(1),
            &ctl(ControlKind::Finish, "u0", 0),
            id(0),
            t,
            &mut out,
        );
    }
    assert_eq!(m.device(ConnId(0)).unwrap().parked.len(), store::PARK_LIMIT);
    assert!(m.take_given_up().is_empty());
    out.clear();
    let later = t + Duration::from_secs(1);
    n += 1;
    m.control(
        ConnId(1),
        &ctl(ControlKind::Request, "u0", 0),
        id(n),
        later,
        &mut out,
    );
    m.approval_done(id(n), Verdict::Allow, later, &mut out);
    assert_eq!(m.take_given_up(), vec![GivenUp::Overflowed(ConnId(0))]);
    assert!(m.device(ConnId(0)).is_none());
    assert_eq!(
        sends(&out),
        vec![(1, EventKind::Reply, codes::CONNECTION_LOST)]
    );
    let lost = out.iter().find_map(|e| match e {
        Effect::Notify(n) if n.code == codes::CONNECTION_LOST => Some(n.at),
        _ => None,
    });
    assert_eq!(lost, Some(later));
    m.check_invariants().unwrap();
}
