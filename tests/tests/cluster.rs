//! Several call-service nodes as processes on one Redis, behind a load
//! balancer, as they are deployed: a node killed (SIGKILL) while its user
//! talks or rings, and the user's client coming back through another node
//! (the SDK reconnects by itself), or never coming back.

use std::time::{Duration, Instant};

use client_sdk::{Code, EventKind};
use videocall_proto::v1 as pb;
use videocall_tests::process::{Proc, binaries, field};
use videocall_tests::redis::RedisServer;
use videocall_tests::{Balancer, PATIENCE, Phone, Proxy, phone_at, talking, user_state};

/// A node's lease in these tests: a dead node is reaped within about this.
const LEASE: &str = "1s";

/// Redis, `n` nodes (processes) on it and a balancer in front.
struct Cluster {
    _redis: RedisServer,
    nodes: Vec<Option<Proc>>,
    admins: Vec<String>,
    /// Each node's `/metrics` address.
    metrics: Vec<String>,
    lb: Balancer,
}

impl Cluster {
    async fn start(n: usize, grace: &str) -> Self {
        let redis = RedisServer::start();
        let bin = binaries().join("call-service");
        let (mut nodes, mut clients, mut admins) = (Vec::new(), Vec::new(), Vec::new());
        let mut metrics = Vec::new();
        for _ in 0..n {
            let mut p = Proc::start(
                &bin,
                &[
                    "--client-addr",
                    "127.0.0.1:0",
                    "--admin-addr",
                    "127.0.0.1:0",
                    "--metrics-addr",
                    "127.0.0.1:0",
                    "--dev-identity",
                    "--redis-url",
                    &redis.url,
                    "--node-lease",
                    LEASE,
                    "--resume-grace",
                    grace,
                ],
            );
            let line = p.line("call-service listening").await;
            clients.push(field(&line, "client"));
            admins.push(format!("http://{}", field(&line, "admin")));
            metrics.push(field(&line, "metrics"));
            nodes.push(Some(p));
        }
        let lb = Balancer::start(clients).await;
        Self {
            _redis: redis,
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
            let text = scrape(addr).await;
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

    /// An admin client of a node other than `dead`.
    async fn admin(&self, dead: usize) -> business_service::admin::Admin {
        let i = (dead + 1) % self.admins.len();
        business_service::admin::Admin::connect(self.admins[i].clone())
            .await
            .expect("admin")
    }
}

/// `GET /metrics` of a node (plain HTTP/1.0).
async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: node\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// Sends a harmless control until one is answered: the client is back
/// (resumed or reconnected), through whichever node.
async fn back(p: &Phone) {
    let deadline = Instant::now() + PATIENCE;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if let Ok(code) = p.client.finish("nobody-at-all").await {
            assert_eq!(code, Code::NOT_IN_CALL);
            return;
        }
        assert!(Instant::now() < deadline, "{} did not come back", p.user);
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
    back(&alice).await;
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
    // the inboxes, round trips to Redis, and the dead node's notice lanes
    // taken over (all 8 owned by the living, some having changed hands).
    // (alice may resume before anyone reaps her device: no count of that.)
    assert!(c.metric("videocall_inbox_lag_seconds_count").await >= 1.0);
    assert!(c.metric("videocall_store_round_trips_total").await >= 1.0);
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
    back(&alice).await;
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
