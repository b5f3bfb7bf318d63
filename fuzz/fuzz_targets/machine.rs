//! Arbitrary sequences of every input of the call rules, across four users
//! with two devices each: connects, streams that break (the device detached
//! for its grace window) and resume, controls, verdicts, time, forced
//! FINISHes. The invariants are checked after each step, and a refused
//! control must change nothing.
#![no_main]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use call_service::codes;
use call_service::machine::{
    CallId, ConnId, Control, ControlKind, Effect, ForceFinish, Machine, MachineConfig, Verdict,
    Initiator,
};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];

#[derive(Arbitrary, Debug)]
enum Kind {
    Request,
    Reply,
    Finish,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Connect(u8),
    Disconnect(u8),
    Lose(u8),
    Resume(u8),
    Control { conn: u8, kind: Kind, peer: u8, code: u32 },
    Approve { pick: u8, refuse: Option<u32> },
    Advance(u16),
    Force { user: u8, code: u32 },
}

fuzz_target!(|ops: Vec<Op>| {
    let mut m = Machine::new(MachineConfig { ring_timeout: Duration::from_secs(30) });
    let mut connected = HashSet::new();
    let mut approvals: Vec<CallId> = Vec::new();
    let mut now = Duration::ZERO;
    let mut next = 0u128;
    let mut out = Vec::new();
    for op in ops.into_iter().take(200) {
        out.clear();
        match op {
            Op::Connect(c) => {
                let c = u64::from(c % 8);
                if connected.insert(c) {
                    m.connect(ConnId(c), Arc::from(USERS[(c % 4) as usize]), &mut out);
                }
            }
            Op::Disconnect(c) => {
                let c = u64::from(c % 8);
                connected.remove(&c);
                m.disconnect(ConnId(c), now, &mut out);
            }
            Op::Lose(c) => {
                let conn = ConnId(u64::from(c % 8));
                if let Some(epoch) = m.device(conn).map(|d| d.epoch) {
                    m.stream_ended(conn, epoch, Some(now + Duration::from_secs(10)), now, &mut out);
                }
            }
            Op::Resume(c) => {
                let conn = ConnId(u64::from(c % 8));
                next += 1;
                if let Some(token) = m.device(conn).map(|d| d.resume_token.clone()) {
                    let user: Arc<str> = Arc::from(USERS[(conn.0 % 4) as usize]);
                    let back = m.resume(&user, &token, Arc::from(format!("t{next}")));
                    assert_eq!(back.map(|b| b.0), Some(conn), "a device's own token did not resume it");
                }
            }
            Op::Control { conn, kind, peer, code } => {
                let conn = u64::from(conn % 8);
                if !connected.contains(&conn) {
                    continue;
                }
                next += 1;
                let ctl = Control {
                    kind: match kind {
                        Kind::Request => ControlKind::Request,
                        Kind::Reply => ControlKind::Reply,
                        Kind::Finish => ControlKind::Finish,
                    },
                    peer: Arc::from(USERS[usize::from(peer % 4)]),
                    code,
                    flags: 0,
                    param: 0,
                    user_str: Arc::from(""),
                };
                let calls = m.calls().count();
                let o = m.control(ConnId(conn), &ctl, CallId(uuid::Uuid::from_u128(next)), now, &mut out);
                if o.code != codes::OK {
                    assert!(out.is_empty(), "a refused control had effects");
                    assert_eq!(calls, m.calls().count());
                }
            }
            Op::Approve { pick, refuse } => {
                if approvals.is_empty() {
                    continue;
                }
                let id = approvals.remove(usize::from(pick) % approvals.len());
                let verdict = match refuse {
                    Some(code) if code != 0 => Verdict::Refuse { code, initiator: Initiator::Business },
                    _ => Verdict::Allow,
                };
                m.approval_done(id, verdict, now, &mut out);
            }
            Op::Advance(ms) => {
                now += Duration::from_millis(u64::from(ms) * 10);
                m.tick(now, &mut out);
            }
            Op::Force { user, code } => {
                let f = ForceFinish {
                    user: Arc::from(USERS[usize::from(user % 4)]),
                    only: None,
                    code,
                    flags: 0,
                    param: 0,
                    user_str: Arc::from(""),
                };
                m.force_finish(&f, now, &mut out);
            }
        }
        // Devices the rules gave up (grace passed, or parked too much).
        connected.retain(|c| m.device(ConnId(*c)).is_some());
        for e in &out {
            match e {
                Effect::Send { conn, .. } => assert!(connected.contains(&conn.0), "event to a gone device"),
                Effect::Approve(n) => approvals.push(n.call_id),
                Effect::Notify(_) => {}
            }
        }
        if let Err(e) = m.check_invariants() {
            panic!("invariant broken: {e}");
        }
    }
});
