//! Several call-service nodes as processes on one Redis, behind a load
//! balancer, as they are deployed: a node killed (SIGKILL) while its user
//! talks or rings, and the user's client coming back through another node
//! (the SDK reconnects by itself), or never coming back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use client_sdk::{Code, EventKind};
use videocall_proto::v1 as pb;
use videocall_tests::process::{Proc, binaries, field};
use videocall_tests::redis::{RedisServer, append_only_args};
use videocall_tests::{
    Balancer, PATIENCE, Phone, Proxy, phone_at, scrape_metrics, talking, user_state,
};

/// A node's lease in these tests: a dead node is reaped within about this.
const LEASE: &str = "1s";

/// Redis, `n` nodes (processes) on it and a balancer in front.
struct Cluster {
    redis: Option<RedisServer>,
    redis_args: Vec<String>,
    nodes: Vec<Option<Proc>>,
    admins: Vec<String>,
    /// Each node's `/metrics` address.
    metrics: Vec<String>,
    lb: Balancer,
}

impl Cluster {
    async fn start(n: usize, grace: &str) -> Self {
        Self::start_with(n, grace, &[], &[]).await
    }

    /// `start`, with redis-server started with `redis_args` and the nodes
    /// with `node_args` too.
    async fn start_with(n: usize, grace: &str, redis_args: &[&str], node_args: &[&str]) -> Self {
        let redis = RedisServer::start_with(redis_args);
        let bin = binaries().join("call-service");
        let (mut nodes, mut clients, mut admins) = (Vec::new(), Vec::new(), Vec::new());
        let mut metrics = Vec::new();
        for _ in 0..n {
            let mut args = vec![
                "--client-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
                "--dev-identity",
                "--redis-url",
                redis.url.as_str(),
                "--node-lease",
                LEASE,
                "--resume-grace",
                grace,
            ];
            args.extend_from_slice(node_args);
            let mut p = Proc::start(&bin, &args);
            let line = p.line("call-service listening").await;
            clients.push(field(&line, "client"));
            admins.push(format!("http://{}", field(&line, "admin")));
            metrics.push(field(&line, "metrics"));
            nodes.push(Some(p));
        }
        let lb = Balancer::start(clients).await;
        Self {
            redis: Some(redis),
            redis_args: redis_args.iter().map(|a| a.to_string()).collect(),
            nodes,
            admins,
            metrics,
            lb,
        }
    }

    /// The sum of a metric (without labels) over the live nodes.
    async fn metric(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for (i, addr) in self.metrics.iter().enumerate() {
            if self.nodes[i].is_none() {
                continue;
            }
            let text = scrape_metrics(addr).await.expect("metrics");
            sum += text
                .lines()
                .find_map(|l| {
                    l.strip_prefix(name)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or_else(|| panic!("no {name} in the metrics of node {i}:\n{text}"));
        }
        sum
    }

    /// A device of `user` through the balancer, and the node it is on.
    async fn phone(&self, user: &str) -> (Phone, usize) {
        let before = self.lb.routes().len();
        let p = phone_at(&self.lb.url, user).await;
        let routes = self.lb.routes();
        assert_eq!(routes.len(), before + 1, "one connection per client");
        (p, routes[before])
    }

    /// Kills node `i` with SIGKILL: no goodbye to anyone.
    async fn kill(&mut self, i: usize) {
        let mut p = self.nodes[i].take().expect("a live node");
        p.child.start_kill().expect("kill");
        p.child.wait().await.expect("reaped");
    }

    /// Kills Redis (SIGKILL) and starts it again on its port with its
    /// arguments (from its append-only file, if they say so).
    fn restart_redis(&mut self) {
        let port = self.redis.take().expect("redis").port;
        let args: Vec<&str> = self.redis_args.iter().map(String::as_str).collect();
        self.redis = Some(RedisServer::start_on(port, &args));
    }

    /// An admin client of a node other than `dead`.
    async fn admin(&self, dead: usize) -> business_service::admin::Admin {
        let i = (dead + 1) % self.admins.len();
        business_service::admin::Admin::connect(self.admins[i].clone())
            .await
            .expect("admin")
    }
}

#[tokio::test]
async fn a_node_killed_mid_call_its_client_resumes_through_another_and_the_peer_sees_nothing() {
    let mut c = Cluster::start(3, "10s").await;
    let (mut alice, on) = c.phone("alice").await;
    let (mut bob, bob_on) = c.phone("bob").await;
    assert_ne!(on, bob_on, "alice and bob on different nodes");
    let room = talking(&mut alice, &mut bob).await;
    let device = alice.client.connection_id().to_owned();
    c.kill(on).await;
    alice.back(PATIENCE).await;
    assert_eq!(
        alice.client.connection_id(),
        device,
        "the same device, resumed (not a new one)"
    );
    assert_ne!(c.lb.routes().last(), Some(&on), "through a live node");
    // The peer saw nothing; the call goes on.
    bob.assert_quiet().await;
    alice.assert_quiet().await;
    let admin = c.admin(on).await;
    assert_eq!(user_state(&admin, "alice").await, pb::UserState::Talking);
    let calls = admin.calls().await.expect("calls");
    assert_eq!(calls.len(), 1, "{calls:?}");
    // Bob hangs up: alice hears it through her new node.
    assert_eq!(bob.client.finish("alice").await.expect("finish"), Code::OK);
    let f = alice.expect(EventKind::Finish, "bob", Code::OK).await;
    assert_eq!(f.room_id().unwrap_or(room), room);
    bob.expect(EventKind::Finish, "alice", Code::OK).await;
    assert_eq!(user_state(&admin, "alice").await, pb::UserState::Idle);
    assert_eq!(user_state(&admin, "bob").await, pb::UserState::Idle);

    // What the live nodes' metrics say of it: the events delivered through
    // the inboxes, round trips to Redis (and their latency), and the dead node's notice lanes
    // taken over (all 8 owned by the living, some having changed hands).
    // (alice may resume before anyone reaps her device: no count of that.)
    assert!(c.metric("videocall_inbox_lag_seconds_count").await >= 1.0);
    assert!(c.metric("videocall_store_round_trips_total").await >= 1.0);
    assert!(c.metric("videocall_store_commit_seconds_count").await >= 1.0);
    let deadline = Instant::now() + PATIENCE;
    while c.metric("videocall_notice_lanes_owned").await != 8.0 {
        assert!(
            Instant::now() < deadline,
            "the dead node's lanes were not taken over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c.metric("videocall_notice_lane_changes_total").await >= 8.0);
}

#[tokio::test]
async fn a_node_killed_while_its_user_rings_someone_the_call_goes_on() {
    let mut c = Cluster::start(3, "10s").await;
    let (mut alice, on) = c.phone("alice").await;
    let (mut bob, _) = c.phone("bob").await;
    alice.call("bob").await;
    bob.expect(EventKind::Request, "alice", Code::OK).await;
    c.kill(on).await;
    alice.back(PATIENCE).await;
    bob.assert_quiet().await;
    assert_eq!(
        bob.client.reply("alice", Code::OK).await.expect("reply"),
        Code::OK
    );
    alice.expect(EventKind::Reply, "bob", Code::OK).await;
    let room = alice.expect(EventKind::Start, "bob", Code::OK).await.param;
    assert_eq!(
        bob.expect(EventKind::Start, "alice", Code::OK).await.param,
        room
    );
    alice.client.finish("bob").await.expect("finish");
    bob.expect(EventKind::Finish, "alice", Code::OK).await;
}

#[tokio::test]
async fn a_client_that_does_not_come_back_ends_the_call_for_its_peer_in_time() {
    let grace = Duration::from_secs(2);
    let mut c = Cluster::start(3, "2s").await;
    // Alice reaches the balancer through a path the test can close: when
    // her node dies, she cannot come back.
    let path = Proxy::start(c.lb.url.trim_start_matches("http://")).await;
    let before = c.lb.routes().len();
    let mut alice = phone_at(&path.url, "alice").await;
    let on = c.lb.routes()[before];
    let (mut bob, bob_on) = c.phone("bob").await;
    assert_ne!(on, bob_on);
    talking(&mut alice, &mut bob).await;
    path.set_open(false);
    path.cut();
    c.kill(on).await;
    let killed = Instant::now();
    let f = bob
        .expect(EventKind::Finish, "alice", Code::CONNECTION_LOST)
        .await;
    let took = killed.elapsed();
    // The lease runs out (1 s), a node reaps it (within half a lease),
    // then the grace window: a few seconds' slack for this machine.
    assert!(
        took >= grace && took < grace + Duration::from_secs(5),
        "bob heard of it after {took:?}"
    );
    assert!(f.code == Code::CONNECTION_LOST);
    let admin = c.admin(on).await;
    assert_eq!(user_state(&admin, "bob").await, pb::UserState::Idle);
    assert_eq!(user_state(&admin, "alice").await, pb::UserState::Offline);
    assert!(admin.calls().await.expect("calls").is_empty());
    drop(alice);
}

/// What one device saw, in the order it saw it.
#[derive(Debug)]
enum Seen {
    /// Its REQUEST to the peer (second) was taken: the call's id.
    Placed(String, String),
    Event(client_sdk::CallEvent),
}

/// Where a device is, as its own events say.
#[derive(Clone, Debug)]
enum View {
    Idle,
    /// Calling the peer (or answered, waiting for START).
    Calling(String),
    Ringing(String),
    Talking(String),
}

fn after(e: &client_sdk::CallEvent) -> View {
    match e.kind {
        EventKind::Request => View::Ringing(e.peer.clone()),
        EventKind::Reply if e.code == Code::OK => View::Calling(e.peer.clone()),
        EventKind::Start => View::Talking(e.peer.clone()),
        EventKind::Reply | EventKind::Finish => View::Idle,
    }
}

/// The run all users share.
struct Run {
    users: Vec<String>,
    placed: std::sync::atomic::AtomicUsize,
    target: usize,
    /// Set once `target` calls were placed: no new calls, calls end.
    stop: std::sync::atomic::AtomicBool,
    /// Set once nobody is in a call: the last events are drained.
    done: std::sync::atomic::AtomicBool,
}

/// One user at random: calls someone, answers, rejects or lets ring,
/// cancels, hangs up; records its REQUESTs taken and every event seen.
async fn random_user(
    mut p: Phone,
    run: std::sync::Arc<Run>,
    seed: u64,
) -> (Phone, Vec<Seen>, usize) {
    use std::sync::atomic::Ordering::SeqCst;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut seen = Vec::new();
    let mut view = View::Idle;
    let mut refused = 0;
    loop {
        let pause = Duration::from_millis(rng.u64(20..80));
        tokio::select! {
            e = p.events.next() => {
                let e = e.unwrap_or_else(|| panic!("{}: the SDK gave up its stream", p.user));
                view = after(&e);
                seen.push(Seen::Event(e));
                continue;
            }
            () = tokio::time::sleep(pause) => {}
        }
        if run.done.load(SeqCst) {
            break;
        }
        let stopping = run.stop.load(SeqCst);
        match view.clone() {
            View::Idle if stopping => {}
            View::Idle => {
                let peer = loop {
                    let u = &run.users[rng.usize(..run.users.len())];
                    if *u != p.user {
                        break u.clone();
                    }
                };
                let r = p
                    .client
                    .control(client_sdk::Control {
                        event_type: pb::EventType::Request as i32,
                        peer: peer.clone(),
                        user_str: format!("{} calling", p.user),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(r) if r.code == Code::OK => {
                        // What the service sent before the result is here,
                        // and maybe more. Nothing of this call comes before
                        // its result: it opens before its first event (or
                        // after all of these, if none came yet).
                        let mut queued = Vec::new();
                        while let Some(e) = p.events.try_next() {
                            queued.push(e);
                        }
                        let first = queued
                            .iter()
                            .position(|e| e.call_id == r.call_id)
                            .unwrap_or(queued.len());
                        let n = queued.len();
                        for (i, e) in queued.into_iter().enumerate() {
                            if i == first {
                                seen.push(Seen::Placed(r.call_id.clone(), peer.clone()));
                            }
                            view = after(&e);
                            seen.push(Seen::Event(e));
                        }
                        if first == n {
                            seen.push(Seen::Placed(r.call_id, peer.clone()));
                            view = View::Calling(peer);
                        }
                        if run.placed.fetch_add(1, SeqCst) + 1 >= run.target {
                            run.stop.store(true, SeqCst);
                        }
                    }
                    // Busy, glare, the store away for a moment, a result
                    // lost with a broken stream: nothing to record here (a
                    // call placed all the same shows in its events).
                    _ => refused += 1,
                }
            }
            View::Calling(peer) => {
                if stopping || rng.u8(0..10) < 2 {
                    let _ = p.client.finish(&peer).await;
                }
            }
            View::Ringing(from) => match rng.u8(0..10) {
                _ if stopping => {
                    let _ = p.client.reply(&from, Code::REJECTED).await;
                }
                0..=5 => {
                    let _ = p.client.reply(&from, Code::OK).await;
                }
                6..=7 => {
                    let _ = p.client.reply(&from, Code::REJECTED).await;
                }
                _ => {} // let it ring (and time out)
            },
            View::Talking(peer) => {
                if stopping || rng.u8(0..10) < 3 {
                    let _ = p.client.finish(&peer).await;
                }
            }
        }
    }
    // Everyone is free: what is still on the way arrives before a
    // control's result, then nothing more may come.
    p.back(PATIENCE).await;
    while let Some(e) = p.events.try_next() {
        seen.push(Seen::Event(e));
    }
    (p, seen, refused)
}

/// The contract's checks of one device's history: at most one live call
/// at any moment, and each call's events form the caller's or the
/// callee's line, complete. Returns the violations, and each call's line.
fn check_history(
    user: &str,
    seen: &[Seen],
) -> (Vec<String>, HashMap<String, Vec<client_sdk::CallEvent>>) {
    let mut bad = Vec::new();
    let mut lines: HashMap<String, Vec<client_sdk::CallEvent>> = HashMap::new();
    for s in seen {
        if let Seen::Event(e) = s {
            lines.entry(e.call_id.clone()).or_default().push(e.clone());
        }
    }
    // Glare: a REQUEST to the peer whose own call to this user is still
    // live is taken and answered REPLY 100103 at once; it never was a
    // second live call.
    let crossed = |call: &str, peer: &str, live: &(String, String)| {
        live.1 == peer
            && lines.get(call).is_some_and(|l| {
                matches!(l.as_slice(), [e] if e.kind == EventKind::Reply && e.code == Code::BUSY)
            })
    };
    let mut open: Option<(String, String)> = None;
    for s in seen {
        let (call, peer, opens, closes) = match s {
            Seen::Placed(call, peer) => (call, peer, true, false),
            Seen::Event(e) => {
                let closes = e.kind == EventKind::Finish
                    || (e.kind == EventKind::Reply && e.code != Code::OK);
                (&e.call_id, &e.peer, e.kind == EventKind::Request, closes)
            }
        };
        match &open {
            Some(live) if live.0 != *call && crossed(call, peer, live) => continue,
            Some(live) if live.0 != *call => bad.push(format!(
                "{user}: an event of call {call} while call {} is live: {s:?}",
                live.0
            )),
            Some(_) if opens => bad.push(format!("{user}: call {call} opened twice")),
            // A caller whose REQUEST's result was lost: its call opens
            // with its first event.
            None => open = Some((call.clone(), peer.clone())),
            Some(_) => {}
        }
        if closes {
            open = None;
        }
    }
    if let Some((o, _)) = open {
        bad.push(format!("{user}: call {o} never ended"));
    }
    for (call, line) in &lines {
        let kinds: Vec<(EventKind, bool)> =
            line.iter().map(|e| (e.kind, e.code == Code::OK)).collect();
        use EventKind::*;
        let ok = matches!(
            kinds.as_slice(),
            [(Reply, false)]
                | [(Reply, true), (Start, _), (Finish, _)]
                | [(Request, _), (Finish, _)]
                | [(Request, _), (Start, _), (Finish, _)]
        );
        if !ok {
            bad.push(format!("{user}: call {call} has the line {kinds:?}"));
        }
    }
    (bad, lines)
}

/// The history check: a few thousand random calls among users spread over
/// three nodes, a node killed (SIGKILL) a third of the way and Redis
/// killed and restarted from its append-only file two thirds of the way.
/// Every device's history is recorded and checked against the contract:
/// at most one live call per user at any moment, every call ends, each
/// device's event line is the caller's or the callee's, and both sides of
/// a call agree on whether it started, and on its room. Afterwards nobody
/// is busy and no call is left.
#[tokio::test]
async fn a_history_of_random_calls_through_node_loss_and_a_redis_restart_keeps_the_contract() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().to_str().expect("utf-8").to_owned();
    let redis_args = append_only_args(&path);
    let redis_args: Vec<&str> = redis_args.iter().map(String::as_str).collect();
    let mut c = Cluster::start_with(3, "10s", &redis_args, &["--ring-timeout", "1s"]).await;
    let users: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    let target = 2_000;
    let run = Arc::new(Run {
        users: users.clone(),
        placed: Default::default(),
        target,
        stop: Default::default(),
        done: Default::default(),
    });
    let seed = std::env::var("VIDEOCALL_HISTORY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("history seed {seed} (VIDEOCALL_HISTORY_SEED={seed} replays the choices)");
    let mut tasks = tokio::task::JoinSet::new();
    for (i, u) in users.iter().enumerate() {
        let (p, _) = c.phone(u).await;
        tasks.spawn(random_user(p, run.clone(), seed.wrapping_add(i as u64)));
    }
    // The faults, a third and two thirds of the way.
    let at = |n: usize| {
        let run = run.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while run.placed.load(SeqCst) < n {
                tick.tick().await;
            }
        }
    };
    at(target / 3).await;
    c.kill(0).await;
    println!("node 0 killed after {} calls", run.placed.load(SeqCst));
    at(target * 2 / 3).await;
    c.restart_redis();
    println!("redis restarted after {} calls", run.placed.load(SeqCst));
    at(target).await;
    // Everyone winds down: then nobody is busy and no call is left.
    let admin = c.admin(0).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let calls = admin.calls().await;
        if calls.as_ref().is_ok_and(Vec::is_empty) {
            break;
        }
        // What is left, in full: which phase, whose devices, since when.
        assert!(
            Instant::now() < deadline,
            "calls never ended (seed {seed}): {calls:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run.done.store(true, SeqCst);
    let mut histories = Vec::new();
    let mut refused = 0;
    while let Some(r) = tasks.join_next().await {
        let (p, seen, r) = r.expect("a user task");
        refused += r;
        histories.push((p, seen));
    }
    for (p, _) in &histories {
        assert_eq!(
            user_state(&admin, &p.user).await,
            pb::UserState::Idle,
            "{} is not free",
            p.user
        );
    }

    let mut bad = Vec::new();
    let mut calls: HashMap<String, Vec<(String, Vec<client_sdk::CallEvent>)>> = HashMap::new();
    let mut events = 0;
    for (p, seen) in &histories {
        events += seen.iter().filter(|s| matches!(s, Seen::Event(_))).count();
        let (b, lines) = check_history(&p.user, seen);
        bad.extend(b);
        for (call, line) in lines {
            calls.entry(call).or_default().push((p.user.clone(), line));
        }
    }
    for (call, sides) in &calls {
        let started: Vec<Option<u32>> = sides
            .iter()
            .map(|(_, l)| l.iter().find_map(|e| e.room_id()))
            .collect();
        if sides.len() == 2 && started[0] != started[1] {
            bad.push(format!(
                "call {call}: the sides disagree on its START: {sides:?}"
            ));
        }
        if sides.len() > 2 {
            bad.push(format!("call {call} seen by more than two devices"));
        }
    }
    println!(
        "{} calls placed, {} calls seen, {events} events, {refused} REQUESTs refused or lost",
        run.placed.load(SeqCst),
        calls.len()
    );
    if let Ok(path) = std::env::var("VIDEOCALL_HISTORY_DUMP") {
        let mut out = String::new();
        for (p, seen) in &histories {
            for s in seen {
                out.push_str(&format!("{} {s:?}\n", p.user));
            }
        }
        std::fs::write(path, out).expect("dump");
    }
    assert!(
        bad.is_empty(),
        "{} violations (seed {seed}):\n{}",
        bad.len(),
        bad[..bad.len().min(20)].join("\n")
    );
    assert!(run.placed.load(SeqCst) >= target);
}
