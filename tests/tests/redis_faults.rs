//! Redis faults under a cluster of three nodes (in this process) with a
//! talking call: the script cache emptied, every connection killed, Redis
//! stopped (SIGSTOP) past the store's timeout and continued, and Redis
//! restarted with its append-only file. After each: the call goes on, a
//! new call works, and no user is left busy.

use std::time::{Duration, Instant};

use client_sdk::{Code, EventKind};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use videocall_proto::v1 as pb;
use videocall_tests::redis::{RedisServer, append_only_args};
use videocall_tests::{
    Balancer, CallService, NodeProcess, PATIENCE, Phone, Proxy, phone_at, talking, user_state,
};

fn redis_cli(redis: &RedisServer, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (Debian's redis-tools, with redis-server)");
    assert!(out.status.success(), "redis-cli {args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Hangs up a talking call from `a`; both hear FINISH.
async fn hang_up(a: &mut Phone, b: &mut Phone) {
    let (ua, ub) = (a.user.clone(), b.user.clone());
    assert_eq!(a.client.finish(&ub).await.expect("finish"), Code::OK);
    a.expect(EventKind::Finish, &ub, Code::OK).await;
    b.expect(EventKind::Finish, &ua, Code::OK).await;
}

/// Nobody busy, no call left.
async fn all_free(svc: &CallService, users: &[&str]) {
    let admin = svc.admin().await;
    for u in users {
        let s = user_state(&admin, u).await;
        assert!(
            matches!(s, pb::UserState::Idle | pb::UserState::Offline),
            "{u} is {s:?}"
        );
    }
    assert!(admin.calls().await.expect("calls").is_empty());
}

#[tokio::test]
async fn an_emptied_script_cache_and_killed_connections_are_not_seen_by_clients() {
    let redis = RedisServer::start();
    let svc = CallService::start_on(&redis.url, 3, None, |_| {}).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    talking(&mut alice, &mut bob).await;
    assert_eq!(redis_cli(&redis, &["SCRIPT", "FLUSH"]).trim(), "OK");
    hang_up(&mut bob, &mut alice).await;
    talking(&mut alice, &mut bob).await;
    // Every node's connections, the blocking readers' among them.
    let killed: u32 = redis_cli(&redis, &["CLIENT", "KILL", "TYPE", "normal"])
        .trim()
        .parse()
        .expect("a count");
    assert!(killed >= 6, "{killed} connections killed");
    hang_up(&mut alice, &mut bob).await;
    talking(&mut bob, &mut alice).await;
    hang_up(&mut alice, &mut bob).await;
    all_free(&svc, &["alice", "bob"]).await;
    svc.stop().await;
}

/// Watches a node's health until it reports `want`.
async fn health_becomes(url: &str, want: ServingStatus) {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(PATIENCE, async {
        while let Some(s) = watch.message().await.expect("health") {
            if s.status == want as i32 {
                return;
            }
        }
        panic!("the health stream ended");
    })
    .await
    .unwrap_or_else(|_| panic!("health never became {want:?}"));
}

#[tokio::test]
async fn redis_stopped_past_the_timeout_refuses_controls_in_time_and_the_call_survives() {
    let redis = RedisServer::start();
    let svc = CallService::start_on(&redis.url, 3, None, |_| {}).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    let carol = svc.phone("carol").await;
    talking(&mut alice, &mut bob).await;
    let pid = redis.pid().to_string();
    let signal = |s: &str| {
        let ok = std::process::Command::new("kill")
            .args([s, &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {s}");
    };
    signal("-STOP");
    let asked = Instant::now();
    let code = carol
        .client
        .request("dave", 0, 0, "")
        .await
        .expect("answered");
    let took = asked.elapsed();
    assert_eq!(code, Code::STORE_UNAVAILABLE);
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    health_becomes(&svc.nodes()[0].client_url, ServingStatus::NotServing).await;
    signal("-CONT");
    for n in svc.nodes() {
        health_becomes(&n.client_url, ServingStatus::Serving).await;
    }
    // The talking call was not touched, and goes on.
    alice.assert_quiet().await;
    bob.assert_quiet().await;
    assert_eq!(
        user_state(&svc.admin().await, "alice").await,
        pb::UserState::Talking
    );
    hang_up(&mut bob, &mut alice).await;
    talking(&mut alice, &mut bob).await;
    hang_up(&mut alice, &mut bob).await;
    all_free(&svc, &["alice", "bob", "carol", "dave"]).await;
    svc.stop().await;
}

/// A device's stream without the SDK (which would reconnect and hide a
/// stream the node closed).
async fn raw_device(
    url: &str,
    user: &str,
) -> (
    tokio::sync::mpsc::Sender<pb::ClientMessage>,
    tonic::Streaming<pb::ServerMessage>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("x-videocall-user", user.parse().expect("ascii"));
    let mut inbound = pb::call_service_client::CallServiceClient::connect(url.to_owned())
        .await
        .expect("connect")
        .session(request)
        .await
        .expect("session")
        .into_inner();
    let first = inbound
        .message()
        .await
        .expect("message")
        .expect("Connected");
    assert!(matches!(
        first.kind,
        Some(pb::server_message::Kind::Connected(_))
    ));
    (tx, inbound)
}

/// How Redis goes away for every node at once.
#[derive(Clone, Copy)]
enum Outage {
    /// SIGSTOP, then SIGCONT: what the nodes sent meanwhile waits in
    /// Redis's sockets and runs when it continues (renewals included).
    Stopped,
    /// Every node's path to Redis cut, then opened: nothing they sent
    /// meanwhile arrives, so every lease lapses and is renewed late.
    Cut,
}

/// Redis away for longer than a lease, then back: every node's lease
/// looks expired to the others, but no node reaps another (a node reaps
/// only once its own lease has been renewed cleanly for a whole lease, by
/// when the others have renewed theirs, late if need be). No stream is
/// closed, no device detached, and the talking call goes on.
async fn no_node_reaps_another_after(outage: Outage) {
    let redis = RedisServer::start();
    let path = Proxy::start(&format!("127.0.0.1:{}", redis.port)).await;
    let url = match outage {
        Outage::Stopped => redis.url.clone(),
        Outage::Cut => format!("redis://{}/", path.url.trim_start_matches("http://")),
    };
    let lease = Duration::from_secs(1);
    let svc = CallService::start_on(&url, 3, None, |c| {
        c.node_lease = lease;
        c.limits.resume_grace = Duration::from_secs(30);
    })
    .await;
    let mut alice = phone_at(&svc.nodes()[0].client_url, "alice").await;
    let mut bob = phone_at(&svc.nodes()[1].client_url, "bob").await;
    talking(&mut alice, &mut bob).await;
    let mut raws = Vec::new();
    for (i, n) in svc.nodes().iter().enumerate() {
        raws.push(raw_device(&n.client_url, &format!("idle{i}")).await);
    }
    let pid = redis.pid().to_string();
    let signal = |s: &str| {
        let ok = std::process::Command::new("kill")
            .args([s, &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {s}");
    };
    match outage {
        Outage::Stopped => signal("-STOP"),
        Outage::Cut => {
            path.set_open(false);
            path.cut();
        }
    }
    // The outage itself: two and a half leases without Redis.
    tokio::time::sleep(lease * 5 / 2).await;
    match outage {
        Outage::Stopped => signal("-CONT"),
        Outage::Cut => path.set_open(true),
    }
    for n in svc.nodes() {
        health_becomes(&n.client_url, ServingStatus::Serving).await;
    }
    // Three leases more: time for a reaper to act, had it been going to.
    tokio::time::sleep(lease * 3).await;
    // Every raw stream is still open and served by its node.
    for (i, (tx, inbound)) in raws.iter_mut().enumerate() {
        assert_served(tx, inbound, &format!("idle{i}")).await;
    }
    // The call's events still go straight to its devices' streams.
    alice.assert_quiet().await;
    bob.assert_quiet().await;
    hang_up(&mut bob, &mut alice).await;
    talking(&mut alice, &mut bob).await;
    hang_up(&mut alice, &mut bob).await;
    svc.stop().await;
}

#[tokio::test]
async fn after_redis_stopped_longer_than_a_lease_no_node_reaps_another() {
    no_node_reaps_another_after(Outage::Stopped).await;
}

#[tokio::test]
async fn after_every_node_is_cut_off_longer_than_a_lease_no_node_reaps_another() {
    no_node_reaps_another_after(Outage::Cut).await;
}

/// The LiveKit breakage: a node alone on Redis, cut off from it (a TCP
/// path the test closes) for longer than its lease. Nobody else can reap
/// it, so it reaps its own lapsed lease, joins again and serves again
/// without a restart; its clients (the SDK resumes them) go on with their
/// call, and a stream opened afterwards is kept.
#[tokio::test]
async fn a_lone_node_serves_again_after_an_outage_longer_than_its_lease() {
    let redis = RedisServer::start();
    let path = Proxy::start(&format!("127.0.0.1:{}", redis.port)).await;
    let lease = Duration::from_secs(1);
    let mut config = call_service::Config::for_tests(None);
    config.redis_url = Some(format!(
        "redis://{}/",
        path.url.trim_start_matches("http://")
    ));
    config.node_lease = lease;
    config.limits.resume_grace = Duration::from_secs(30);
    let node = NodeProcess::start_at("127.0.0.1:0", config).await;
    let mut alice = phone_at(&node.client_url, "alice").await;
    let mut bob = phone_at(&node.client_url, "bob").await;
    talking(&mut alice, &mut bob).await;
    path.set_open(false);
    path.cut();
    health_becomes(&node.client_url, ServingStatus::NotServing).await;
    // The outage itself: two and a half leases without Redis.
    tokio::time::sleep(lease * 5 / 2).await;
    path.set_open(true);
    health_becomes(&node.client_url, ServingStatus::Serving).await;
    // Both devices come back (resumed) and the call goes on.
    let deadline = Instant::now() + PATIENCE;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for p in [&alice, &bob] {
        loop {
            tick.tick().await;
            if let Ok(Code::NOT_IN_CALL) = p.client.finish("nobody-at-all").await {
                break;
            }
            assert!(Instant::now() < deadline, "{} did not come back", p.user);
        }
    }
    let admin = business_service::admin::Admin::connect(node.admin_url.clone())
        .await
        .expect("admin");
    assert_eq!(user_state(&admin, "alice").await, pb::UserState::Talking);
    // It holds its lease again: a stream opened now is kept (a node that
    // had not joined again would drop it at its next renewal).
    let (tx, mut inbound) = raw_device(&node.client_url, "carol").await;
    tokio::time::sleep(lease * 3).await;
    assert_served(&tx, &mut inbound, "carol").await;
    hang_up(&mut bob, &mut alice).await;
    talking(&mut alice, &mut bob).await;
    hang_up(&mut alice, &mut bob).await;
    node.stop().await;
}

/// A control on a raw stream is answered on it: the stream is open and
/// its node serves it.
async fn assert_served(
    tx: &tokio::sync::mpsc::Sender<pb::ClientMessage>,
    inbound: &mut tonic::Streaming<pb::ServerMessage>,
    who: &str,
) {
    let control = pb::CallControl {
        seq: 7,
        event_type: pb::EventType::Finish as i32,
        peer_user_id: "nobody-at-all".into(),
        ..Default::default()
    };
    tx.send(pb::ClientMessage {
        kind: Some(pb::client_message::Kind::Control(control)),
    })
    .await
    .unwrap_or_else(|_| panic!("{who}'s stream is closed"));
    let msg = tokio::time::timeout(PATIENCE, inbound.message())
        .await
        .expect("in time");
    match msg {
        Ok(Some(pb::ServerMessage {
            kind: Some(pb::server_message::Kind::Result(r)),
        })) => assert_eq!((r.seq, r.code), (7, Code::NOT_IN_CALL.0), "{who}"),
        other => panic!("{who}'s stream: {other:?}"),
    }
}

#[tokio::test]
async fn redis_restarted_with_its_append_only_file_loses_no_call() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().to_str().expect("utf-8").to_owned();
    let args = append_only_args(&path);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let redis = RedisServer::start_with(&args);
    let port = redis.port;
    let svc = CallService::start_on(&redis.url, 3, None, |_| {}).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    let mut carol = svc.phone("carol").await;
    let mut dave = svc.phone("dave").await;
    talking(&mut alice, &mut bob).await;
    carol.call("dave").await;
    dave.expect(EventKind::Request, "carol", Code::OK).await;
    // Killed (SIGKILL) and started again from its file, on its port.
    drop(redis);
    let _redis = RedisServer::start_on(port, &args);
    // Both calls go on: the ringing one is answered, the talking one ends.
    assert_eq!(
        dave.client.reply("carol", Code::OK).await.expect("reply"),
        Code::OK
    );
    carol.expect(EventKind::Reply, "dave", Code::OK).await;
    carol.expect(EventKind::Start, "dave", Code::OK).await;
    dave.expect(EventKind::Start, "carol", Code::OK).await;
    hang_up(&mut bob, &mut alice).await;
    hang_up(&mut dave, &mut carol).await;
    talking(&mut alice, &mut dave).await;
    hang_up(&mut dave, &mut alice).await;
    all_free(&svc, &["alice", "bob", "carol", "dave"]).await;
    svc.stop().await;
}

/// Redis restarted empty (no persistence): the cluster's state is gone.
/// Documented behaviour: every node finds its lease gone, ends its streams
/// and joins again; clients reconnect as new devices (their resume tokens
/// went with the data) and the SDK ends their calls for them (FINISH, or a
/// caller's REPLY, 100106); nobody is left busy and new calls work.
#[tokio::test]
async fn redis_restarted_empty_leaves_nobody_busy() {
    let redis = RedisServer::start();
    let port = redis.port;
    let svc = CallService::start_on(&redis.url, 3, None, |c| {
        c.node_lease = Duration::from_secs(1);
    })
    .await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    let mut carol = svc.phone("carol").await;
    let mut dave = svc.phone("dave").await;
    talking(&mut alice, &mut bob).await;
    carol.call("dave").await;
    dave.expect(EventKind::Request, "carol", Code::OK).await;
    drop(redis);
    let _redis = RedisServer::start_on(port, &["--save", "", "--appendonly", "no"]);
    // Each device hears its call end.
    alice
        .expect(EventKind::Finish, "bob", Code::CONNECTION_LOST)
        .await;
    bob.expect(EventKind::Finish, "alice", Code::CONNECTION_LOST)
        .await;
    carol
        .expect(EventKind::Reply, "dave", Code::CONNECTION_LOST)
        .await;
    dave.expect(EventKind::Finish, "carol", Code::CONNECTION_LOST)
        .await;
    // Everyone is free, and calls work again, across the nodes.
    let deadline = Instant::now() + PATIENCE;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if alice.client.request("dave", 3, 0, "again").await.ok() == Some(Code::OK) {
            break;
        }
        assert!(Instant::now() < deadline, "alice could not call again");
    }
    dave.expect(EventKind::Request, "alice", Code::OK).await;
    assert_eq!(
        dave.client.reply("alice", Code::OK).await.expect("reply"),
        Code::OK
    );
    alice.expect(EventKind::Reply, "dave", Code::OK).await;
    alice.expect(EventKind::Start, "dave", Code::OK).await;
    dave.expect(EventKind::Start, "alice", Code::OK).await;
    hang_up(&mut dave, &mut alice).await;
    talking(&mut bob, &mut carol).await;
    hang_up(&mut carol, &mut bob).await;
    all_free(&svc, &["alice", "bob", "carol", "dave"]).await;
    svc.stop().await;
}

/// One of two nodes is cut off from Redis (a TCP path the test closes)
/// while the other goes on: past its lease and half the grace window it
/// closes its streams (the other has reaped it meanwhile), its
/// client comes back through the balancer to the other node and resumes
/// the same device, the peer sees nothing, and the call goes on. When the
/// path opens again the node serves again.
#[tokio::test]
async fn a_node_cut_off_from_redis_hands_its_clients_to_the_others() {
    let redis = RedisServer::start();
    let path = Proxy::start(&format!("127.0.0.1:{}", redis.port)).await;
    let through_path = format!("redis://{}/", path.url.trim_start_matches("http://"));
    let config = |url: &str| {
        let mut c = call_service::Config::for_tests(None);
        c.redis_url = Some(url.to_owned());
        c.node_lease = Duration::from_secs(1);
        // The cut node closes its streams after its lease and half of
        // this: 4 s.
        c.limits.resume_grace = Duration::from_secs(6);
        c
    };
    let cut = NodeProcess::start_at("127.0.0.1:0", config(&through_path)).await;
    let other = NodeProcess::start_at("127.0.0.1:0", config(&redis.url)).await;
    let addr = |n: &NodeProcess| n.client_url.trim_start_matches("http://").to_owned();
    let lb = Balancer::start(vec![addr(&cut), addr(&other)]).await;
    let mut alice = phone_at(&lb.url, "alice").await;
    let mut bob = phone_at(&lb.url, "bob").await;
    assert_eq!(
        lb.routes(),
        [0, 1],
        "alice on the node to cut, bob on the other"
    );
    talking(&mut alice, &mut bob).await;
    let device = alice.client.connection_id().to_owned();
    path.set_open(false);
    path.cut();
    // Until alice is back on the other node her controls are refused
    // (STORE_UNAVAILABLE) or fail with the stream; then answered.
    let deadline = Instant::now() + PATIENCE;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if let Ok(Code::NOT_IN_CALL) = alice.client.finish("nobody-at-all").await {
            break;
        }
        assert!(Instant::now() < deadline, "alice did not come back");
    }
    assert_eq!(
        alice.client.connection_id(),
        device,
        "the same device, resumed"
    );
    assert_eq!(
        lb.routes().last(),
        Some(&1),
        "through the node still on Redis"
    );
    bob.assert_quiet().await;
    assert_eq!(bob.client.finish("alice").await.expect("finish"), Code::OK);
    alice.expect(EventKind::Finish, "bob", Code::OK).await;
    bob.expect(EventKind::Finish, "alice", Code::OK).await;
    // The path opens: the cut node finds its lease gone, joins again and
    // serves.
    path.set_open(true);
    health_becomes(&cut.client_url, ServingStatus::Serving).await;
    let mut carol = phone_at(&cut.client_url, "carol").await;
    talking(&mut carol, &mut bob).await;
    hang_up(&mut carol, &mut bob).await;
    cut.stop().await;
    other.stop().await;
}
