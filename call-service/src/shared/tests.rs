//! The rules over the shared store, against a real `redis-server` started
//! on a free port: races between nodes that only the commit's version
//! checks can settle. `scripts/test.sh` installs redis-server; without it
//! these tests fail (they never pass without having run).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::codes;
use crate::domain::{ControlKind, EventKind, Initiator, Phase};
use crate::shared::Lease;

/// A `redis-server` of the test's own, killed when dropped.
struct Redis {
    child: Child,
    url: String,
}

impl Redis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: install it (scripts/test.sh does: apt-get install redis-server)");
        // Ready once it says so: no polling, no sleeping.
        let out = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("Ready to accept connections") => break,
                Some(Ok(_)) => {}
                _ => panic!("redis-server ended before it was ready"),
            }
        }
        // Its later output is not read: keep the pipe drained.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
        }
    }

    async fn node(&self, n: u32) -> Node {
        let store = SharedStore::connect(&self.url, "vc:", NodeId(n))
            .await
            .expect("connect to redis");
        Node::new(store, Duration::from_secs(30))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn user(s: &str) -> UserId {
    Arc::from(s)
}

fn ctl(kind: ControlKind, peer: &str, code: u32) -> Control {
    Control {
        kind,
        peer: user(peer),
        code,
        flags: 0,
        param: 0,
        user_str: Arc::from(""),
    }
}

const T0: Time = Duration::from_secs(1_800_000_000);

async fn attach(node: &mut Node, conn: ConnId, who: &str) {
    let token: Arc<str> = Arc::from(format!("token-{}", conn.0));
    node.attach(conn, user(who), token, 8, &mut Vec::new())
        .await
        .unwrap()
        .unwrap();
}

/// A REQUEST from `conn`'s current stream, without a quota: its outcome.
async fn request(
    n: &mut Node,
    conn: ConnId,
    peer: &str,
    id: CallId,
    now: Time,
    out: &mut Vec<Effect>,
) -> Outcome {
    n.control(
        conn,
        None,
        &ctl(ControlKind::Request, peer, 0),
        id,
        None,
        now,
        out,
    )
    .await
    .unwrap()
    .expect("from the current stream")
}

/// A control from `conn`'s current stream, answered OK: the round trips
/// it took.
async fn control_ok(
    n: &mut Node,
    conn: ConnId,
    kind: ControlKind,
    peer: &str,
    id: CallId,
    out: &mut Vec<Effect>,
) -> u64 {
    let before = n.store().round_trips();
    let r = n
        .control(conn, None, &ctl(kind, peer, 0), id, None, T0, out)
        .await
        .unwrap()
        .expect("from the current stream");
    assert_eq!(r.code, codes::OK, "{kind:?}: {r:?}");
    n.store().round_trips() - before
}

/// Two nodes, alice's device on node 1 and bob's on node 2.
async fn alice_and_bob(redis: &Redis) -> (Node, Node, ConnId, ConnId) {
    let (mut n1, mut n2) = (redis.node(1).await, redis.node(2).await);
    let (a, b) = (ConnId::on(NodeId(1), 1), ConnId::on(NodeId(2), 1));
    attach(&mut n1, a, "alice").await;
    attach(&mut n2, b, "bob").await;
    (n1, n2, a, b)
}

/// What a node's inbox holds, taken as the node's reader would (read,
/// then trimmed): the events for its devices; and every notice in the
/// notice lanes.
async fn drain(n: &mut Node) -> (Vec<(ConnId, Event)>, Vec<Notice>) {
    let node = n.store().node();
    let entries = n.store().inbox(node, "0-0", 100_000).await.unwrap();
    if let Some((last, _)) = entries.last() {
        n.store().trim_inbox(node, last).await.unwrap();
    }
    let mut events = Vec::new();
    for (_, e) in entries {
        match e {
            Inbound::Event { conn, event, .. } => events.push((conn, event)),
            Inbound::Notice(n) => panic!("a notice in an inbox: {n:?}"),
            Inbound::Moved { conn, .. } => panic!("{conn:?} moved"),
        }
    }
    // The notice lanes, as their owner would read them.
    let mut notices = Vec::new();
    for lane in 0..NOTICE_LANES {
        let got = n.store().lane(lane, "0-0", 100_000).await.unwrap();
        let mut callers = HashMap::new();
        for (_, notice) in &got {
            *callers.entry(notice.caller.clone()).or_insert(0) += 1;
        }
        if let Some((last, _)) = got.last() {
            let done = LaneDone {
                lane,
                upto: last.clone(),
                callers,
            };
            n.store().lanes_done(&[done]).await.unwrap();
        }
        notices.extend(got.into_iter().map(|(_, n)| n));
    }
    (events, notices)
}

/// Two users on two nodes call each other at the same moment, 1,000 times:
/// exactly one call each time, and both users in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glare_across_two_nodes_makes_exactly_one_call() {
    let redis = Redis::start();
    let (mut n1, mut n2, a, b) = alice_and_bob(&redis).await;
    let (mut one_each, mut conflicts_seen) = (0, 0);
    for round in 0..1_000u32 {
        let (ida, idb) = (CallId(uuid::Uuid::now_v7()), CallId(uuid::Uuid::now_v7()));
        let now = T0 + Duration::from_millis(u64::from(round));
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        let before = n1.store().conflicts() + n2.store().conflicts();
        let (to_bob, to_alice) = (
            ctl(ControlKind::Request, "bob", 0),
            ctl(ControlKind::Request, "alice", 0),
        );
        let (ra, rb) = tokio::join!(
            n1.control(a, None, &to_bob, ida, None, now, &mut oa),
            n2.control(b, None, &to_alice, idb, None, now, &mut ob),
        );
        let (ra, rb) = (ra.unwrap().unwrap(), rb.unwrap().unwrap());
        conflicts_seen += n1.store().conflicts() + n2.store().conflicts() - before;
        // Both controls are taken (the contract's glare: the crossing
        // REQUEST is answered with REPLY 100103), and one call is live.
        assert_eq!((ra.code, rb.code), (codes::OK, codes::OK), "round {round}");
        let live = n1.user_call("alice").await.unwrap().map(|c| c.id);
        assert_eq!(
            live,
            n2.user_call("bob").await.unwrap().map(|c| c.id),
            "round {round}"
        );
        let (e1, e2) = (drain(&mut n1).await.0, drain(&mut n2).await.0);
        let (id, caller, node, lost, loser, loser_in) = match live {
            Some(id) if id == ida => (ida, a, &mut n1, idb, b, &e2),
            Some(id) if id == idb => (idb, b, &mut n2, ida, a, &e1),
            other => panic!("round {round}: the live call is {other:?}"),
        };
        let busy = loser_in
            .iter()
            .filter(|(c, e)| {
                *c == loser
                    && e.kind == EventKind::Reply
                    && e.call_id == lost
                    && e.code == codes::BUSY
            })
            .count();
        assert_eq!(
            busy, 1,
            "round {round}: the crossing REQUEST's REPLY 100103"
        );
        one_each += 1;
        // The caller hangs up while the approval is out: both are free.
        let peer = if caller == a { "bob" } else { "alice" };
        let r = node
            .control(
                caller,
                None,
                &ctl(ControlKind::Finish, peer, 0),
                id,
                None,
                now,
                &mut Vec::new(),
            )
            .await
            .unwrap()
            .expect("from the current stream");
        assert_eq!(r.code, codes::OK, "round {round}: cancel");
        node.approval_done(id, Verdict::Allow, now, &mut Vec::new())
            .await
            .unwrap();
        assert!(n1.user_call("alice").await.unwrap().is_none());
        assert!(n1.user_call("bob").await.unwrap().is_none());
    }
    println!(
        "1000 rounds of glare: one call each time; {conflicts_seen} commits lost a race and ran again"
    );
    assert_eq!(one_each, 1_000);
    assert!(
        conflicts_seen > 0,
        "the two nodes never raced: the test did not test the commit's checks"
    );
}

/// Eight devices of one user on three nodes answer the same call at once,
/// each through a connection of its own, 100 times: one wins, the seven
/// others hear ANSWERED_ELSEWHERE once each, and the caller one START.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_devices_on_three_nodes_answer_at_once_and_one_wins() {
    let redis = Redis::start();
    let mut nodes = [
        redis.node(1).await,
        redis.node(2).await,
        redis.node(3).await,
    ];
    let alice = ConnId::on(NodeId(1), 100);
    attach(&mut nodes[0], alice, "alice").await;
    let mut bobs = Vec::new();
    for i in 0..8u64 {
        let n = (i % 3) as usize;
        let conn = ConnId::on(NodeId(n as u32 + 1), i + 1);
        attach(&mut nodes[n], conn, "bob").await;
        // A handle of the device's node with a connection of its own.
        bobs.push((conn, redis.node(n as u32 + 1).await));
    }
    let mut conflicts = 0;
    for round in 0..100u64 {
        let id = CallId(uuid::Uuid::now_v7());
        let now = T0 + Duration::from_secs(round);
        let mut out = Vec::new();
        let r = nodes[0]
            .control(
                alice,
                None,
                &ctl(ControlKind::Request, "bob", 0),
                id,
                None,
                now,
                &mut out,
            )
            .await
            .unwrap()
            .expect("from the current stream");
        assert_eq!(r.code, codes::OK);
        nodes[0]
            .approval_done(id, Verdict::Allow, now, &mut out)
            .await
            .unwrap();
        let mut events: Vec<(ConnId, Event)> = Vec::new();
        let before: u64 = bobs
            .iter()
            .map(|(_, n)| n.clone().store().conflicts())
            .sum();
        let answers: Vec<_> = bobs
            .iter()
            .map(|(conn, node)| {
                let (conn, mut node) = (*conn, node.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    let answer = ctl(ControlKind::Reply, "alice", 0);
                    let r = node
                        .control(conn, None, &answer, id, None, now, &mut out)
                        .await
                        .unwrap()
                        .expect("from the current stream");
                    (conn, r, out)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for a in answers {
            let (conn, r, out) = a.await.unwrap();
            if r.code == codes::OK {
                winners.push(conn);
            }
            assert!(out.is_empty(), "only approvals stay in out: {out:?}");
        }
        conflicts += bobs
            .iter()
            .map(|(_, n)| n.clone().store().conflicts())
            .sum::<u64>()
            - before;
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let winner = winners[0];
        for n in nodes.iter_mut() {
            events.extend(drain(n).await.0);
        }
        let call = nodes[0].user_call("bob").await.unwrap().expect("a call");
        assert!(matches!(call.phase, Phase::Talking { callee_conn, .. } if callee_conn == winner));
        let count = |conn: ConnId, kind: EventKind, code: Option<u32>| {
            events
                .iter()
                .filter(|(c, e)| *c == conn && e.call_id == id && e.kind == kind)
                .filter(|(_, e)| code.is_none_or(|code| e.code == code))
                .count()
        };
        for &(conn, _) in &bobs {
            assert_eq!(
                count(conn, EventKind::Request, None),
                1,
                "{conn:?} rang once"
            );
            let elsewhere = count(conn, EventKind::Finish, Some(codes::ANSWERED_ELSEWHERE));
            assert_eq!(
                elsewhere,
                usize::from(conn != winner),
                "round {round}: {conn:?}"
            );
            assert_eq!(
                count(conn, EventKind::Start, None),
                usize::from(conn == winner)
            );
        }
        assert_eq!(
            count(alice, EventKind::Start, None),
            1,
            "the caller's START"
        );
        // Hang up: both free for the next round.
        let r = nodes[0]
            .control(
                alice,
                None,
                &ctl(ControlKind::Finish, "bob", 0),
                id,
                None,
                now,
                &mut Vec::new(),
            )
            .await
            .unwrap()
            .expect("from the current stream");
        assert_eq!(r.code, codes::OK);
    }
    println!("100 rounds of 8 answers at once: one winner each; {conflicts} commits lost a race");
    assert!(conflicts > 0, "the answers never raced");
}

/// A ring deadline fired by two nodes at once, and again later, 200 times:
/// one REPLY 100105 to the caller, one FINISH to the callee, one notice,
/// both users free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_fired_twice_and_late_acts_once() {
    let redis = Redis::start();
    let (mut n1, mut n2, a, b) = alice_and_bob(&redis).await;
    let mut conflicts = 0;
    for round in 0..200u64 {
        let id = CallId(uuid::Uuid::now_v7());
        let now = T0 + Duration::from_secs(100 * round);
        let mut out = Vec::new();
        request(&mut n1, a, "bob", id, now, &mut out).await;
        n1.approval_done(id, Verdict::Allow, now, &mut out)
            .await
            .unwrap();
        assert!(n1.store().due(now, 10).await.unwrap().is_empty());
        let late = now + Duration::from_secs(35);
        let before = n1.store().conflicts() + n2.store().conflicts();
        let fire = |mut n: Node| {
            tokio::spawn(async move {
                let mut out = Vec::new();
                n.tick(late, &mut out).await.unwrap();
                out
            })
        };
        let (f1, f2) = (fire(n1.clone()), fire(n2.clone()));
        let (o1, o2) = (f1.await.unwrap(), f2.await.unwrap());
        conflicts += n1.store().conflicts() + n2.store().conflicts() - before;
        let mut again = Vec::new();
        n2.tick(late + Duration::from_secs(60), &mut again)
            .await
            .unwrap();
        assert!(o1.is_empty() && o2.is_empty() && again.is_empty());
        let (mut events, mut notices) = drain(&mut n1).await;
        let (more_events, more_notices) = drain(&mut n2).await;
        events.extend(more_events);
        notices.extend(more_notices);
        let timed_out = |conn, kind| {
            events
                .iter()
                .filter(|(c, e)| {
                    *c == conn && e.call_id == id && e.kind == kind && e.code == codes::NO_ANSWER
                })
                .count()
        };
        assert_eq!(
            timed_out(a, EventKind::Reply),
            1,
            "round {round}: the caller's REPLY 100105"
        );
        assert_eq!(
            timed_out(b, EventKind::Finish),
            1,
            "round {round}: the callee's FINISH 100105"
        );
        let notices = notices
            .iter()
            .filter(|n| {
                n.call_id == id && n.code == codes::NO_ANSWER && n.initiator == Initiator::Service
            })
            .count();
        assert_eq!(notices, 1, "round {round}: one notice of the timeout");
        assert!(n1.user_call("alice").await.unwrap().is_none());
        assert!(n2.user_call("bob").await.unwrap().is_none());
        assert!(
            n1.store()
                .due(late + Duration::from_secs(60), 10)
                .await
                .unwrap()
                .is_empty()
        );
    }
    println!(
        "200 ring deadlines fired by two nodes at once: each acted once; {conflicts} commits lost a race"
    );
    assert!(conflicts > 0, "the two fires never raced");
}

/// Sets up a talking call between alice (node 1) and bob (node 2); returns
/// bob's device.
async fn talking(n1: &mut Node, n2: &mut Node, id: CallId, now: Time) -> ConnId {
    let (a, b) = (ConnId::on(NodeId(1), 1), ConnId::on(NodeId(2), 1));
    attach(n1, a, "alice").await;
    attach(n2, b, "bob").await;
    let mut out = Vec::new();
    let r = n1
        .control(
            a,
            None,
            &ctl(ControlKind::Request, "bob", 0),
            id,
            None,
            now,
            &mut out,
        )
        .await
        .unwrap()
        .expect("from the current stream");
    assert_eq!(r.code, codes::OK);
    n1.approval_done(id, Verdict::Allow, now, &mut out)
        .await
        .unwrap();
    let r = n2
        .control(
            b,
            None,
            &ctl(ControlKind::Reply, "alice", 0),
            id,
            None,
            now,
            &mut out,
        )
        .await
        .unwrap()
        .expect("from the current stream");
    assert_eq!(r.code, codes::OK);
    let call = n1.user_call("alice").await.unwrap().expect("a call");
    assert!(matches!(call.phase, Phase::Talking { callee_conn, .. } if callee_conn == b));
    // Both nodes alive so far: they have handed on what they were sent.
    drain(n1).await;
    drain(n2).await;
    b
}

const LEASE: Duration = Duration::from_secs(5);
const GRACE: Duration = Duration::from_secs(10);

/// A node stops renewing its lease (it died): another node reaps it, its
/// device is detached with the grace window running, the peer sees
/// nothing, and the client resumes through the other node; the call goes
/// on. The dead node, back, cannot renew.
#[tokio::test]
async fn a_reaped_nodes_device_resumes_on_another_node_and_the_call_goes_on() {
    let redis = Redis::start();
    let (mut n1, mut n2) = (redis.node(1).await, redis.node(2).await);
    assert_eq!(
        n1.store().lease(T0, LEASE, true).await.unwrap(),
        Lease::Held
    );
    assert_eq!(
        n2.store().lease(T0, LEASE, true).await.unwrap(),
        Lease::Held
    );
    let id = CallId(uuid::Uuid::now_v7());
    let b = talking(&mut n1, &mut n2, id, T0).await;
    // Node 1 renews; node 2 does not. Before the lease ends nothing is reaped.
    let t1 = T0 + Duration::from_secs(3);
    assert_eq!(
        n1.store().lease(t1, LEASE, false).await.unwrap(),
        Lease::Held
    );
    let mut out = Vec::new();
    assert_eq!(n1.reap(t1, GRACE, &mut out).await.unwrap(), 0);
    let t2 = T0 + Duration::from_secs(6);
    assert_eq!(
        n1.store().lease(t2, LEASE, false).await.unwrap(),
        Lease::Held
    );
    assert_eq!(
        n1.reap(t2, GRACE, &mut out).await.unwrap(),
        1,
        "bob's device reaped"
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(
        drain(&mut n1).await,
        (vec![], vec![]),
        "the peer sees nothing"
    );
    let call = n1
        .user_call("alice")
        .await
        .unwrap()
        .expect("the call goes on");
    assert!(matches!(call.phase, Phase::Talking { .. }));
    // The dead node comes back: its lease is gone for good.
    assert_eq!(
        n2.store().lease(t2, LEASE, false).await.unwrap(),
        Lease::Lost
    );
    let a = ConnId::on(NodeId(1), 1);
    let mut out = Vec::new();
    // Bob resumes through node 1 with the token he had.
    let (conn, _, parked) = n1
        .resume(&user("bob"), &format!("token-{}", b.0), Arc::from("next"))
        .await
        .unwrap()
        .expect("resumed");
    assert_eq!((conn, parked.len()), (b, 0));
    // Now alice hangs up: bob hears FINISH on node 1, his new node.
    let r = n1
        .control(
            a,
            None,
            &ctl(ControlKind::Finish, "bob", 0),
            id,
            None,
            t2,
            &mut out,
        )
        .await
        .unwrap()
        .expect("from the current stream");
    assert_eq!(r.code, codes::OK);
    let finish = drain(&mut n1)
        .await
        .0
        .into_iter()
        .filter(|(c, e)| *c == b && e.kind == EventKind::Finish && e.call_id == id)
        .count();
    assert_eq!(finish, 1, "bob's FINISH, delivered by node 1: {out:?}");
    // Node 2 has nothing left: the next reaping forgets it.
    assert!(n1.store().node_devices(NodeId(2)).await.unwrap().is_empty());
    assert_eq!(n1.reap(t2, GRACE, &mut Vec::new()).await.unwrap(), 0);
    assert!(
        n1.store().expired_nodes(t2).await.unwrap().is_empty(),
        "node 2 forgotten"
    );
}

/// A reaped node's client never comes back: when the grace window ends,
/// on whichever node fires it, the peer gets FINISH 100106 and both users
/// are free. Events meanwhile were parked in the device's record.
#[tokio::test]
async fn a_reaped_nodes_client_that_never_returns_ends_the_call_at_the_window() {
    let redis = Redis::start();
    let (mut n1, mut n2) = (redis.node(1).await, redis.node(2).await);
    n1.store().lease(T0, LEASE, true).await.unwrap();
    n2.store().lease(T0, LEASE, true).await.unwrap();
    let id = CallId(uuid::Uuid::now_v7());
    let b = talking(&mut n1, &mut n2, id, T0).await;
    let t = T0 + Duration::from_secs(6);
    n1.store().lease(t, LEASE, false).await.unwrap();
    let mut out = Vec::new();
    assert_eq!(n1.reap(t, GRACE, &mut out).await.unwrap(), 1);
    // Reaping again changes nothing.
    assert_eq!(n1.reap(t, GRACE, &mut out).await.unwrap(), 0);
    assert!(
        n1.store()
            .due(t + GRACE - Duration::from_millis(1), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let mut out = Vec::new();
    n1.tick(t + GRACE, &mut out).await.unwrap();
    let a = ConnId::on(NodeId(1), 1);
    let lost = drain(&mut n1)
        .await
        .0
        .into_iter()
        .filter(|(c, e)| {
            *c == a
                && e.kind == EventKind::Finish
                && e.call_id == id
                && e.code == codes::CONNECTION_LOST
        })
        .count();
    assert_eq!(lost, 1, "alice's FINISH 100106: {out:?}");
    assert!(n1.user_call("alice").await.unwrap().is_none());
    assert!(n1.user_call("bob").await.unwrap().is_none());
    // Bob's device is gone, and with it node 2.
    let _ = b;
    assert!(n1.store().node_devices(NodeId(2)).await.unwrap().is_empty());
    assert!(n1.store().forget(NodeId(2), t + GRACE).await.unwrap());
}

/// A node's inbox reader waits for what another node commits for its
/// devices, in commit order, and a reader reopened from the last entry it
/// read gets only what came after.
#[tokio::test]
async fn an_inbox_reader_waits_for_another_nodes_events_and_resumes_from_its_last_entry() {
    let redis = Redis::start();
    let (mut n1, mut n2) = (redis.node(1).await, redis.node(2).await);
    // From the start (the inbox is empty): what arrives before the reader's
    // first XREAD is not missed.
    let mut reader = InboxReader::open(&redis.url, "vc:", NodeId(2), "0-0")
        .await
        .unwrap();
    // Nothing yet: the wait ends empty.
    assert!(
        reader
            .next(Duration::from_millis(20), 100)
            .await
            .unwrap()
            .is_empty()
    );
    let (a, b) = (ConnId::on(NodeId(1), 1), ConnId::on(NodeId(2), 1));
    attach(&mut n1, a, "alice").await;
    attach(&mut n2, b, "bob").await;
    let id = CallId(uuid::Uuid::now_v7());
    // While the reader waits, node 1 rings bob (on node 2).
    let waiting = tokio::spawn(async move {
        let got = reader.next(Duration::from_secs(30), 100).await.unwrap();
        (reader, got)
    });
    let mut out = Vec::new();
    request(&mut n1, a, "bob", id, T0, &mut out).await;
    n1.approval_done(id, Verdict::Allow, T0, &mut out)
        .await
        .unwrap();
    let (mut reader, got) = waiting.await.unwrap();
    // Bob's REQUEST; the call's notices went to node 1's inbox.
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        matches!(&got[0].1, Inbound::Event { conn, epoch: 1, event }
            if *conn == b && event.kind == EventKind::Request && event.call_id == id),
        "{got:?}"
    );
    // Alice cancels: bob's FINISH follows, and a reader reopened from the
    // last entry read gets it alone.
    n1.control(
        a,
        None,
        &ctl(ControlKind::Finish, "bob", 0),
        id,
        None,
        T0,
        &mut out,
    )
    .await
    .unwrap()
    .expect("from the current stream");
    let mut again = InboxReader::open(&redis.url, "vc:", NodeId(2), reader.last())
        .await
        .unwrap();
    let more = again.next(Duration::from_secs(30), 100).await.unwrap();
    assert_eq!(more.len(), 1, "{more:?}");
    assert!(
        matches!(&more[0].1, Inbound::Event { conn, event, .. }
            if *conn == b && event.kind == EventKind::Finish && event.code == codes::CANCELLED),
        "{more:?}"
    );
    assert_eq!(
        reader
            .next(Duration::from_secs(30), 100)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A commit's mark is the committing node's last inbox entry before the
/// commit's own: what the node must have handed on before the result of
/// the control that committed (its device's earlier events come first).
#[tokio::test]
async fn a_commits_mark_is_its_nodes_last_inbox_entry_before_it() {
    let redis = Redis::start();
    let (mut n1, mut n2, a, b) = alice_and_bob(&redis).await;
    let id = CallId(uuid::Uuid::now_v7());
    let mut out = Vec::new();
    // Node 1's inbox is empty: nothing to wait for.
    request(&mut n1, a, "bob", id, T0, &mut out).await;
    assert_eq!(n1.store().mark(), EntryId::default());
    n1.approval_done(id, Verdict::Allow, T0, &mut out)
        .await
        .unwrap();
    let inbox = |n: &mut Node| {
        let mut store = n.store().clone();
        let node = store.node();
        async move { store.inbox(node, "0-0", 100).await.unwrap() }
    };
    // Bob's REQUEST is in node 2's inbox: bob's answer may follow it only.
    let before = inbox(&mut n2).await;
    let request = EntryId::parse(&before.last().expect("bob's REQUEST").0).unwrap();
    n2.control(
        b,
        None,
        &ctl(ControlKind::Reply, "alice", 0),
        id,
        None,
        T0,
        &mut out,
    )
    .await
    .unwrap()
    .expect("from the current stream");
    assert_eq!(n2.store().mark(), request);
    // The answer's own events (bob's START) come after the mark.
    let after = inbox(&mut n2).await;
    assert!(after.len() > before.len(), "{after:?}");
    assert!(
        after[before.len()..]
            .iter()
            .all(|(e, _)| EntryId::parse(e).unwrap() > request)
    );
}

/// A detached device keeps what it is sent, up to the limit; one more and
/// it is given up, stamped with the time of the input that overflowed it.
#[tokio::test]
async fn a_detached_device_that_parks_too_much_is_given_up() {
    let redis = Redis::start();
    let (mut n1, mut n2, a, b) = alice_and_bob(&redis).await;
    let epoch = n2
        .store()
        .read(|t| t.device(&b).map(|d| d.epoch))
        .await
        .unwrap();
    n2.stream_ended(
        b,
        epoch.unwrap(),
        Some(T0 + Duration::from_secs(3_600)),
        T0,
        &mut Vec::new(),
    )
    .await
    .unwrap();
    // Each call rings bob's detached device (REQUEST parked) and is
    // cancelled (FINISH parked): two messages a round.
    let parked = |n: &mut Node| {
        let mut n = n.clone();
        async move {
            n.store()
                .read(|t| t.device(&b).map(|d| d.parked.len()))
                .await
                .unwrap()
        }
    };
    let mut round = 0u64;
    let mut out = Vec::new();
    while parked(&mut n1).await.is_some() {
        assert!(round < 200, "never given up");
        let id = CallId(uuid::Uuid::now_v7());
        let now = T0 + Duration::from_secs(round);
        request(&mut n1, a, "bob", id, now, &mut out).await;
        n1.approval_done(id, Verdict::Allow, now, &mut out)
            .await
            .unwrap();
        if parked(&mut n1).await.is_some() {
            let r = n1
                .control(
                    a,
                    None,
                    &ctl(ControlKind::Finish, "bob", 0),
                    id,
                    None,
                    now,
                    &mut out,
                )
                .await
                .unwrap()
                .expect("from the current stream");
            assert_eq!(r.code, codes::OK, "round {round}");
        }
        if let Some(n) = parked(&mut n1).await {
            assert!(n <= crate::store::PARK_LIMIT, "{n} parked");
        }
        round += 1;
    }
    // Given up at the 257th message: in round 128 (its REQUEST).
    assert_eq!(round, 129);
    let last = drain(&mut n1)
        .await
        .1
        .iter()
        .map(|n| n.at)
        .max()
        .expect("notices");
    assert_eq!(
        last,
        T0 + Duration::from_secs(128),
        "stamped with the input's time"
    );
    assert!(n1.user_call("bob").await.unwrap().is_none());
}

/// The node that asked for a call's approval dies before the answer: at
/// the deadline another node decides it by the failure policy (REPLY
/// 100201), with the REQUEST told to the business service first; a call
/// cancelled while waiting has its held notices released the same way.
#[tokio::test]
async fn a_call_whose_node_died_while_asking_is_decided_at_its_deadline() {
    let redis = Redis::start();
    let (mut n1, mut n2, a, _b) = alice_and_bob(&redis).await;
    let timeout = Duration::from_secs(3);
    let refuse = Verdict::Refuse {
        code: codes::BUSINESS_UNAVAILABLE,
        initiator: Initiator::Service,
    };
    n1.time_approvals(timeout, refuse);
    n2.time_approvals(timeout, refuse);
    for cancel in [false, true] {
        let id = CallId(uuid::Uuid::now_v7());
        let mut out = Vec::new();
        request(&mut n1, a, "bob", id, T0, &mut out).await;
        assert!(matches!(out.as_slice(), [Effect::Approve(_)]), "{out:?}");
        if cancel {
            n1.control(
                a,
                None,
                &ctl(ControlKind::Finish, "bob", 0),
                id,
                None,
                T0,
                &mut out,
            )
            .await
            .unwrap()
            .expect("from the current stream");
        }
        drain(&mut n1).await;
        // Node 1 dies here. Before the deadline nothing happens.
        let mut out = Vec::new();
        n2.tick(T0 + timeout - Duration::from_millis(1), &mut out)
            .await
            .unwrap();
        let (events, notices) = drain(&mut n1).await;
        assert!(
            events.is_empty() && notices.is_empty(),
            "{events:?} {notices:?}"
        );
        n2.tick(T0 + timeout, &mut out).await.unwrap();
        let (events, notices) = drain(&mut n1).await;
        let kinds: Vec<_> = notices.iter().map(|n| (n.kind, n.seq, n.code)).collect();
        if cancel {
            assert!(events.is_empty(), "{events:?}");
            assert_eq!(
                kinds,
                [
                    (EventKind::Request, 1, 0),
                    (EventKind::Reply, 2, codes::CANCELLED)
                ]
            );
        } else {
            assert!(
                matches!(events.as_slice(), [(c, e)] if *c == a
                    && e.kind == EventKind::Reply && e.code == codes::BUSINESS_UNAVAILABLE),
                "{events:?}"
            );
            assert_eq!(
                kinds,
                [
                    (EventKind::Request, 1, 0),
                    (EventKind::Reply, 2, codes::BUSINESS_UNAVAILABLE)
                ]
            );
        }
        assert!(n2.user_call("alice").await.unwrap().is_none());
        assert!(
            n2.store()
                .due(T0 + timeout * 10, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

/// The round trips each input of a call takes, counted. With `touch`,
/// every record of the call is committed again behind the node's back
/// before each input (a new version, the same content: as another node's
/// commit that changed nothing of them), so that what the node cached is
/// stale.
async fn trips_per_input(redis: &Redis, touch: bool) -> Vec<(&'static str, u64)> {
    let mut n = redis.node(1).await;
    let (a, b) = (ConnId::on(NodeId(1), 1), ConnId::on(NodeId(1), 2));
    attach(&mut n, a, "alice").await;
    attach(&mut n, b, "bob").await;
    let id = CallId(uuid::Uuid::now_v7());
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut out = Vec::new();
    let mut counted = Vec::new();
    let inputs = [
        ("REQUEST", Some((a, ControlKind::Request, "bob"))),
        ("the approval", None),
        ("REPLY", Some((b, ControlKind::Reply, "alice"))),
        ("FINISH", Some((a, ControlKind::Finish, "bob"))),
    ];
    for (what, input) in inputs {
        if touch {
            let keys = [
                "vc:u:alice".to_owned(),
                "vc:u:bob".to_owned(),
                format!("vc:d:{}", a.0),
                format!("vc:d:{}", b.0),
                format!("vc:c:{id}"),
            ];
            for key in keys {
                let v: u64 = redis::cmd("INCR")
                    .arg("vc:seq")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let _: i64 = redis::Script::new(
                    "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'v', ARGV[1]) end return 0",
                )
                .key(key)
                .arg(v)
                .invoke_async(&mut conn)
                .await
                .unwrap();
            }
        }
        let trips = match input {
            Some((c, kind, peer)) => control_ok(&mut n, c, kind, peer, id, &mut out).await,
            None => {
                let before = n.store().round_trips();
                n.approval_done(id, Verdict::Allow, T0, &mut out)
                    .await
                    .unwrap();
                n.store().round_trips() - before
            }
        };
        counted.push((what, trips));
    }
    assert!(n.user_call("alice").await.unwrap().is_none());
    assert!(n.user_call("bob").await.unwrap().is_none());
    counted
}

/// An input names most of what it reads, and a node keeps the records it
/// loaded and committed: each input of a call whose records only this node
/// writes takes one round trip, its commit.
#[tokio::test]
async fn each_input_of_a_call_takes_one_round_trip_on_records_it_holds() {
    let redis = Redis::start();
    for (what, trips) in trips_per_input(&redis, false).await {
        assert_eq!(trips, 1, "{what}");
    }
}

/// When another node committed the records an input reads, the commit over
/// the cached records is refused with their current values and the next
/// attempt commits over those: two round trips, no load, and the call goes
/// on as the contract says (every input above succeeds).
#[tokio::test]
async fn an_input_over_records_another_node_committed_takes_two_commits() {
    let redis = Redis::start();
    for (what, trips) in trips_per_input(&redis, true).await {
        assert_eq!(trips, 2, "{what}");
    }
}

/// Round trips of the answer (node 2) and the hang-up (node 1) of a
/// second call between alice on node 1 and bob on node 2, each node having
/// read its inbox before its input, as a client answers only what it was
/// sent. With `fed`, the readers put what the entries carry in their
/// nodes' caches.
async fn trips_across_nodes(redis: &Redis, fed: bool) -> Vec<(&'static str, u64)> {
    let (mut n1, mut n2, a, b) = alice_and_bob(redis).await;
    let mut r1 = InboxReader::open(&redis.url, "vc:", NodeId(1), "0-0")
        .await
        .unwrap();
    let mut r2 = InboxReader::open(&redis.url, "vc:", NodeId(2), "0-0")
        .await
        .unwrap();
    if fed {
        r1 = r1.feeding(n1.store());
        r2 = r2.feeding(n2.store());
    }
    async fn next(r: &mut InboxReader, kind: EventKind) {
        let got = r.next(Duration::from_secs(30), 100).await.unwrap();
        assert!(
            got.iter()
                .any(|(_, e)| matches!(e, Inbound::Event { event, .. } if event.kind == kind)),
            "{kind:?} in {got:?}"
        );
    }
    let mut counted = Vec::new();
    for round in 0..2 {
        let id = CallId(uuid::Uuid::now_v7());
        let mut out = Vec::new();
        request(&mut n1, a, "bob", id, T0, &mut out).await;
        n1.approval_done(id, Verdict::Allow, T0, &mut out)
            .await
            .unwrap();
        next(&mut r2, EventKind::Request).await;
        let reply = control_ok(&mut n2, b, ControlKind::Reply, "alice", id, &mut out).await;
        next(&mut r1, EventKind::Start).await;
        let finish = control_ok(&mut n1, a, ControlKind::Finish, "bob", id, &mut out).await;
        next(&mut r2, EventKind::Finish).await;
        if round == 1 {
            counted = vec![("REPLY", reply), ("FINISH", finish)];
        }
    }
    assert!(n1.user_call("alice").await.unwrap().is_none());
    assert!(n2.user_call("bob").await.unwrap().is_none());
    counted
}

/// The first event a commit sends to another node carries the records the
/// commit read and wrote, and that node's reader caches them: an answer
/// after a REQUEST rung from another node, and a hang-up after the START
/// it sent back, each commit in one round trip. Without them, each finds a
/// record the other node changed and takes two or more.
#[tokio::test]
async fn an_input_after_another_nodes_event_commits_over_what_the_event_carried() {
    let redis = Redis::start();
    for (what, trips) in trips_across_nodes(&redis, true).await {
        assert_eq!(trips, 1, "{what}, fed");
    }
    let redis = Redis::start();
    for (what, trips) in trips_across_nodes(&redis, false).await {
        assert!(trips >= 2, "{what}, not fed: {trips}");
    }
}

/// A REQUEST whose commit ran but whose reply never came back is tried
/// again with the same call id (after a connection found dropped): the
/// retry is refused as stale on the call it guessed absent, then reads the
/// call and answers it placed, and sends nothing twice.
#[tokio::test]
async fn a_request_tried_again_after_its_commit_ran_is_answered_placed() {
    let redis = Redis::start();
    let (mut n1, mut n2, a, _) = alice_and_bob(&redis).await;
    let id = CallId(uuid::Uuid::now_v7());
    let mut out = Vec::new();
    assert_eq!(
        request(&mut n1, a, "bob", id, T0, &mut out).await.code,
        codes::OK
    );
    assert!(
        out.iter().any(|e| matches!(e, Effect::Approve(_))),
        "{out:?}"
    );
    let conflicts = n1.store().conflicts();
    let mut again = Vec::new();
    let o = request(&mut n1, a, "bob", id, T0, &mut again).await;
    assert_eq!((o.code, o.call_id), (codes::OK, Some(id)));
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(n1.store().conflicts(), conflicts + 1);
    assert_eq!(n2.user_call("bob").await.unwrap().map(|c| c.id), Some(id));
}

/// The per-caller notice quota is checked by the REQUEST's commit, where
/// the count is: at the quota the REQUEST is refused and nothing changes;
/// below it the call is placed.
#[tokio::test]
async fn a_request_at_its_callers_notice_quota_is_refused_by_its_commit() {
    let redis = Redis::start();
    let mut n1 = redis.node(1).await;
    let (a, b) = (ConnId::on(NodeId(1), 1), ConnId::on(NodeId(1), 2));
    attach(&mut n1, a, "alice").await;
    attach(&mut n1, b, "bob").await;
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("HSET")
        .arg("vc:pending")
        .arg("alice")
        .arg(4)
        .query_async(&mut conn)
        .await
        .unwrap();
    let quota = Some((UserId::from("alice"), 4));
    let request = ctl(ControlKind::Request, "bob", 0);
    let id = CallId(uuid::Uuid::now_v7());
    let mut out = Vec::new();
    let r = n1
        .control(a, None, &request, id, quota.clone(), T0, &mut out)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.code, codes::OVERLOADED, "{r:?}");
    assert!(out.is_empty(), "nothing happens: {out:?}");
    assert!(n1.user_call("alice").await.unwrap().is_none());
    assert!(n1.user_call("bob").await.unwrap().is_none());

    let _: i64 = redis::cmd("HSET")
        .arg("vc:pending")
        .arg("alice")
        .arg(3)
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = n1
        .control(a, None, &request, id, quota, T0, &mut out)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.code, codes::OK, "{r:?}");
    assert_eq!(n1.user_call("alice").await.unwrap().map(|c| c.id), Some(id));
}

/// A lapsed lease that no node has begun to reap is renewed late (after
/// an outage of Redis every node does so, and keeps its streams); once a
/// reaper has marked it, it is lost, and the node joins again only after
/// reaping itself.
#[tokio::test]
async fn a_lapsed_lease_is_renewed_late_unless_a_reaper_has_marked_it() {
    let redis = Redis::start();
    let (mut n1, mut n2) = (redis.node(1).await, redis.node(2).await);
    for n in [&mut n1, &mut n2] {
        assert_eq!(n.store().lease(T0, LEASE, true).await.unwrap(), Lease::Held);
    }
    // Both lapse (Redis was away); nobody reaps before renewing.
    let t1 = T0 + LEASE * 2;
    for n in [&mut n1, &mut n2] {
        assert_eq!(
            n.store().lease(t1, LEASE, false).await.unwrap(),
            Lease::Held,
            "renewed late"
        );
    }
    // Node 2 lapses again, alone: node 1 marks it, as a reaper does first.
    let t2 = t1 + LEASE * 2;
    assert_eq!(
        n1.store().lease(t2, LEASE, false).await.unwrap(),
        Lease::Held
    );
    let node2 = n2.store().node();
    assert!(
        !n1.store().mark_reaping(node2, t1).await.unwrap(),
        "a live lease is not marked"
    );
    assert!(n1.store().mark_reaping(node2, t2).await.unwrap());
    assert_eq!(
        n2.store().lease(t2, LEASE, false).await.unwrap(),
        Lease::Lost,
        "a lease being reaped is not renewed"
    );
    // It reaps itself, and joins again.
    let mut out = Vec::new();
    n2.reap_self(t2, GRACE, &mut out).await.unwrap();
    assert_eq!(
        n2.store().lease(t2, LEASE, true).await.unwrap(),
        Lease::Held
    );
    let t3 = t2 + LEASE / 2;
    assert_eq!(
        n2.store().lease(t3, LEASE, false).await.unwrap(),
        Lease::Held,
        "the mark went with the old lease"
    );
}

/// A REQUEST whose commit ran but whose node never asked for its approval
/// (the reply was lost: Redis killed or slow right then; or the node died)
/// is not left waiting: without a business service its approval timer
/// allows it at the deadline, on any node, and the callee rings.
#[tokio::test]
async fn a_request_never_asked_about_rings_at_its_deadline_without_a_business_service() {
    let redis = Redis::start();
    let (mut n1, mut n2, a, b) = alice_and_bob(&redis).await;
    let timeout = Duration::from_secs(3);
    n1.time_approvals(timeout, Verdict::Allow);
    n2.time_approvals(timeout, Verdict::Allow);
    let id = CallId(uuid::Uuid::now_v7());
    let mut out = Vec::new();
    request(&mut n1, a, "bob", id, T0, &mut out).await;
    // The approval it asks for is dropped, as with a lost reply.
    assert!(matches!(out.as_slice(), [Effect::Approve(_)]), "{out:?}");
    drain(&mut n1).await;
    let mut out = Vec::new();
    n2.tick(T0 + timeout, &mut out).await.unwrap();
    // Bob's device is on node 2.
    let (events, _) = drain(&mut n2).await;
    assert!(
        matches!(events.as_slice(), [(c, e)] if *c == b && e.kind == EventKind::Request),
        "{events:?}"
    );
    let call = n2.user_call("alice").await.unwrap().expect("the call");
    assert!(matches!(call.phase, Phase::Ringing { .. }), "{call:?}");
}
