//! Dead peers and resume: a stream cut mid-call and resumed within the
//! grace window (the peer sees nothing), one cut for longer (the peer gets
//! 100106), and a server restart with clients reconnecting by themselves.

use std::time::Duration;

use client_sdk::{Code, EventKind};
use videocall_proto::v1 as pb;
use videocall_tests::phone_at;
use videocall_tests::{CallService, PATIENCE, Proxy, talking, user_state};

#[tokio::test]
async fn a_stream_cut_mid_call_resumes_and_the_peer_sees_nothing() {
    let svc = CallService::start(None, |c| c.limits.resume_grace = Duration::from_secs(20)).await;
    let proxy = Proxy::start(svc.client_url.trim_start_matches("http://")).await;
    let mut alice = phone_at(&proxy.url, "alice").await;
    let mut bob = svc.phone("bob").await;
    talking(&mut alice, &mut bob).await;

    // The network drops alice's connection; new connections are refused
    // until bob has hung up, so the FINISH is sent while alice is away.
    proxy.set_open(false);
    proxy.cut();
    let admin = svc.admin().await;
    assert_eq!(user_state(&admin, "alice").await, pb::UserState::Talking);
    bob.client.finish("alice").await.expect("finish");
    bob.expect(EventKind::Finish, "alice", Code::OK).await;
    proxy.set_open(true);
    // alice's SDK reconnects by itself, resumes, and gets what it missed.
    alice.expect(EventKind::Finish, "bob", Code::OK).await;
    bob.assert_quiet().await;
    // Still the same device, and it works.
    assert_eq!(
        admin.user_state("alice").await.expect("state").connections,
        1
    );
    talking(&mut alice, &mut bob).await;
    svc.stop().await;
}

#[tokio::test]
async fn a_control_lost_with_a_broken_stream_gets_one_answer_after_the_resume() {
    let svc = CallService::start(None, |c| c.limits.resume_grace = Duration::from_secs(20)).await;
    let proxy = Proxy::start(svc.client_url.trim_start_matches("http://")).await;
    let mut alice = phone_at(&proxy.url, "alice").await;
    let mut bob = svc.phone("bob").await;
    talking(&mut alice, &mut bob).await;

    // The path goes dead; alice hangs up into it; then it breaks.
    proxy.freeze();
    let r = {
        let finish = alice.client.finish("bob");
        tokio::pin!(finish);
        // Polled once: the control is on its way (into the dead path).
        tokio::select! {
            biased;
            r = &mut finish => panic!("answered through a dead path: {r:?}"),
            () = std::future::ready(()) => {}
        }
        proxy.cut();
        // The SDK resumes the device; the FINISH never reached the service,
        // and its caller hears so, once, instead of waiting for ever.
        tokio::time::timeout(PATIENCE, finish)
            .await
            .expect("the control got no answer")
    };
    assert!(
        matches!(r, Err(client_sdk::Error::ResultLost)),
        "expected ResultLost, got {r:?}"
    );
    // Nothing changed: the call is on, bob saw nothing, and alice can hang
    // up now.
    assert_eq!(
        user_state(&svc.admin().await, "alice").await,
        pb::UserState::Talking
    );
    bob.assert_quiet().await;
    assert_eq!(alice.client.finish("bob").await.expect("finish"), Code::OK);
    alice.expect(EventKind::Finish, "bob", Code::OK).await;
    bob.expect(EventKind::Finish, "alice", Code::OK).await;
    svc.stop().await;
}

#[tokio::test]
async fn past_the_grace_window_the_peer_gets_100106() {
    let svc =
        CallService::start(None, |c| c.limits.resume_grace = Duration::from_millis(300)).await;
    let proxy = Proxy::start(svc.client_url.trim_start_matches("http://")).await;
    let mut alice = phone_at(&proxy.url, "alice").await;
    let mut bob = svc.phone("bob").await;
    talking(&mut alice, &mut bob).await;
    proxy.set_open(false);
    proxy.cut();
    bob.expect(EventKind::Finish, "alice", Code::CONNECTION_LOST)
        .await;
    assert_eq!(
        user_state(&svc.admin().await, "bob").await,
        pb::UserState::Idle
    );
    proxy.set_open(true);
    // alice comes back as a new device and can call again.
    until(
        "alice back as a new device",
        Duration::from_secs(20),
        || async { user_state(&svc.admin().await, "alice").await == pb::UserState::Idle },
    )
    .await;
    // Her SDK ends the lost device's call for her application, as bob's was.
    alice
        .expect(EventKind::Finish, "bob", Code::CONNECTION_LOST)
        .await;
    talking(&mut alice, &mut bob).await;
    svc.stop().await;
}

#[tokio::test]
async fn clients_reconnect_by_themselves_after_a_server_restart() {
    let port = videocall_tests::process::free_port().await;
    let addr = format!("127.0.0.1:{port}");
    let svc = CallService::start_at(&addr, None, |_| {}).await;
    let url = svc.client_url.clone();
    let mut alice = phone_at(&url, "alice").await;
    let mut bob = phone_at(&url, "bob").await;
    talking(&mut alice, &mut bob).await;
    svc.stop().await;
    alice
        .expect(EventKind::Finish, "bob", Code::TERMINATED)
        .await;
    bob.expect(EventKind::Finish, "alice", Code::TERMINATED)
        .await;

    let svc = CallService::start_at(&addr, None, |_| {}).await;
    let admin = svc.admin().await;
    until("both clients reconnected", PATIENCE * 2, || async {
        let a = admin.user_state("alice").await.expect("state").connections;
        let b = admin.user_state("bob").await.expect("state").connections;
        a == 1 && b == 1
    })
    .await;
    talking(&mut alice, &mut bob).await;
    svc.stop().await;
}

/// Looks every 50 ms until `check` holds; fails, saying what did not
/// happen, after `limit`. The clients reconnect on their own time: there
/// is no event to wait for.
async fn until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
    }
}
