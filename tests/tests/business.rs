//! The reference business service: policy reloads, call records and the
//! maximum call duration, against a real call service.

use std::time::Duration;

use business_service::records::{self, Query};
use business_service::{Business, Config};
use client_sdk::{Code, EventKind};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use videocall_proto::v1 as pb;
use videocall_tests::CallService;

/// Starts the business service on a listener bound beforehand, so the call
/// service and the business service can know each other's address.
async fn start_business(
    listener: TcpListener,
    config: Config,
) -> (business_service::Hook, oneshot::Sender<()>) {
    let business = Business::start(config).expect("business service starts");
    let hook = business.hook().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(business.serve(listener, None, async {
        let _ = stopped.await;
    }));
    (hook, stop)
}

#[tokio::test]
async fn policy_reloads_keep_the_last_good_policy() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "blocked_callers = [\"mallory\"]\n[codes]\nblocked_caller = 300001\n",
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let svc = CallService::start(Some(&url), |_| {}).await;
    let config = Config {
        policy_file: Some(file.clone()),
        reload_interval: Some(Duration::from_millis(20)),
        ..Default::default()
    };
    let (hook, _stop) = start_business(listener, config).await;
    let mut mallory = svc.phone("mallory").await;
    let mut bob = svc.phone("bob").await;
    mallory.call("bob").await;
    mallory.expect(EventKind::Reply, "bob", Code(300_001)).await;

    // A broken file is refused; the policy in force stays.
    std::fs::write(&file, "blocked_callers = [\"mallory\"\n").unwrap();
    let err = hook.policy().reload().unwrap_err();
    assert!(err.to_string().contains("invalid policy"), "{err}");
    mallory.call("bob").await;
    mallory.expect(EventKind::Reply, "bob", Code(300_001)).await;

    // A good one takes over, on reload (as on SIGHUP)...
    std::fs::write(&file, "blocked_callees = [\"bob\"]\n").unwrap();
    hook.policy().reload().unwrap();
    mallory.call("bob").await;
    mallory.expect(EventKind::Reply, "bob", Code(200_002)).await;
    bob.assert_quiet().await;

    // ... and when the file changes, by itself.
    std::fs::write(&file, "# everybody may call\n").unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut reloaded = false;
    for _ in 0..500 {
        tick.tick().await;
        if hook.policy().get().blocked_callees.is_empty() {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "the changed policy file was not reloaded");
    mallory.call("bob").await;
    bob.expect(EventKind::Request, "mallory", Code::OK).await;
    svc.stop().await;
}

#[tokio::test]
async fn calls_reaching_the_maximum_duration_are_ended_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, "max_call_duration = \"300ms\"\n").unwrap();
    let db = dir.path().join("records.db");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let svc = CallService::start(Some(&url), |_| {}).await;
    let config = Config {
        policy_file: Some(file),
        database: Some(db.clone()),
        admin_url: Some(svc.admin_url.clone()),
        ..Default::default()
    };
    let (hook, _stop) = start_business(listener, config).await;
    let mut log = hook.subscribe();
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    let call_id = alice.call("bob").await;
    bob.expect(EventKind::Request, "alice", Code::OK).await;
    bob.client.reply("alice", Code::OK).await.unwrap();
    alice.expect(EventKind::Reply, "bob", Code::OK).await;
    alice.expect(EventKind::Start, "bob", Code::OK).await;
    bob.expect(EventKind::Start, "alice", Code::OK).await;
    // Nobody hangs up: the business service does, with its code.
    let e = alice.expect(EventKind::Finish, "bob", Code(200_007)).await;
    assert_eq!(e.user_str, "maximum call duration reached");
    bob.expect(EventKind::Finish, "alice", Code(200_007)).await;
    // The record is complete once the FINISH notice is stored.
    loop {
        let n = tokio::time::timeout(videocall_tests::PATIENCE, log.recv())
            .await
            .unwrap()
            .unwrap();
        if n.call_id == call_id && n.event_type == 4 {
            break;
        }
    }
    let conn = records::open(&db).unwrap();
    let r = records::query(&conn, Query::Call(&call_id), 1)
        .unwrap()
        .remove(0);
    assert!(r.complete && !r.missed);
    assert_eq!(
        (r.end_code, r.ended_by.as_deref()),
        (Some(200_007), Some("business"))
    );
    assert!(r.duration_ms.unwrap() >= 300, "{r:?}");
    assert!(r.rang_ms.is_some() && r.room_id.is_some());
    svc.stop().await;
}

/// Finding 7 of the attack run: re-dialling a callee who declines kept them
/// busy. By default the reference business service refuses a caller's call
/// to a callee who declined it in the last 10 s, with its own code; the
/// callee and everyone else are free meanwhile.
#[tokio::test]
async fn re_dialling_a_callee_who_declined_is_refused_for_a_while() {
    let business = videocall_tests::Business::start(&[]).await;
    let svc = CallService::start(Some(&business.url), |_| {}).await;
    let mut mallory = svc.phone("mallory").await;
    let mut bob = svc.phone("bob").await;
    let mut friend = svc.phone("friend").await;
    let mut log = business.log();
    let call_id = mallory.call("bob").await;
    bob.expect(EventKind::Request, "mallory", Code::OK).await;
    assert_eq!(
        bob.client
            .reply("mallory", Code::REJECTED)
            .await
            .expect("reply"),
        Code::OK
    );
    mallory
        .expect(EventKind::Reply, "bob", Code::REJECTED)
        .await;
    bob.expect(EventKind::Finish, "mallory", Code::REJECTED)
        .await;
    // Notices are not awaited by the call: once the business service has
    // the REPLY, it knows bob declined.
    while log.call(&call_id, 1).await[0].event_type != pb::EventType::Reply as i32 {}
    // Again at once: refused by the business service, bob never rings.
    for _ in 0..5 {
        mallory.call("bob").await;
        mallory.expect(EventKind::Reply, "bob", Code(200_008)).await;
    }
    bob.assert_quiet().await;
    // bob is free for a friend, and free to call out.
    videocall_tests::talking(&mut friend, &mut bob).await;
    assert_eq!(friend.client.finish("bob").await.expect("finish"), Code::OK);
    friend.expect(EventKind::Finish, "bob", Code::OK).await;
    bob.expect(EventKind::Finish, "friend", Code::OK).await;
    // mallory may still call others.
    mallory.call("friend").await;
    friend.expect(EventKind::Request, "mallory", Code::OK).await;
    svc.stop().await;
    business.stop().await;
}
