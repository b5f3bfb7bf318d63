//! Every line of the behaviour contract, over real gRPC connections: a real
//! call service, the real business service, SDK clients.

use std::time::{Duration, Instant};

use client_sdk::{Code, EventKind};
use tokio::net::TcpListener;
use videocall_proto::v1 as pb;
use videocall_tests::{Business, CallService, start_silent_hook, user_state};

use EventKind::{Finish, Reply, Request as Req, Start};

#[tokio::test]
async fn a_whole_call_reaches_both_parties_and_the_business_hook_in_order() {
    let business = Business::start(&[]).await;
    let mut hook = business.log();
    let svc = CallService::start(Some(&business.url), |_| {}).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;

    let call_id = alice.call("bob").await;
    let ring = bob.expect(Req, "alice", Code::OK).await;
    assert_eq!(
        (ring.flags, ring.param, ring.user_str.as_str()),
        (3, 42, "alice calling")
    );
    assert_eq!(ring.call_id, call_id);
    assert_eq!(
        user_state(&svc.admin().await, "bob").await,
        pb::UserState::Ringing
    );

    assert_eq!(bob.client.reply("alice", Code::OK).await.unwrap(), Code::OK);
    alice.expect(Reply, "bob", Code::OK).await;
    let room = alice
        .expect(Start, "bob", Code::OK)
        .await
        .room_id()
        .unwrap();
    assert_ne!(room, 0);
    assert_eq!(
        bob.expect(Start, "alice", Code::OK).await.room_id(),
        Some(room)
    );
    let admin = svc.admin().await;
    assert_eq!(user_state(&admin, "alice").await, pb::UserState::Talking);
    let calls = admin.calls().await.unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].room_id, calls[0].phase),
        (room, pb::CallPhase::Talking as i32)
    );

    assert_eq!(alice.client.finish("bob").await.unwrap(), Code::OK);
    alice.expect(Finish, "bob", Code::OK).await;
    bob.expect(Finish, "alice", Code::OK).await;
    assert_eq!(user_state(&admin, "alice").await, pb::UserState::Idle);
    assert_eq!(user_state(&admin, "bob").await, pb::UserState::Idle);

    let notices = hook.call(&call_id, 4).await;
    let kinds: Vec<_> = notices
        .iter()
        .map(|n| (n.event_type, n.sequence, n.error_code))
        .collect();
    assert_eq!(kinds, vec![(1, 1, 0), (2, 2, 0), (3, 3, 0), (4, 4, 0)]);
    assert!(notices[0].decision_required && !notices[1].decision_required);
    assert_eq!(
        (
            notices[0].source_user_id.as_str(),
            notices[0].target_user_id.as_str()
        ),
        ("alice", "bob")
    );
    assert_eq!(notices[0].user_str, "alice calling");
    assert_eq!(notices[2].param, room);
    assert_eq!(notices[3].source_user_id, "alice");
    let ids: std::collections::HashSet<_> = notices.iter().map(|n| n.event_id.clone()).collect();
    assert_eq!(ids.len(), 4, "event ids are unique");
    assert!(notices.iter().all(|n| n.time.is_some()));
    alice.assert_quiet().await;
    bob.assert_quiet().await;
    svc.stop().await;
    business.stop().await;
}

#[tokio::test]
async fn offline_callee_gives_100102() {
    let svc = CallService::start(None, |_| {}).await;
    let mut alice = svc.phone("alice").await;
    alice.call("nobody").await;
    alice.expect(Reply, "nobody", Code::OFFLINE).await;
    assert_eq!(
        user_state(&svc.admin().await, "alice").await,
        pb::UserState::Idle
    );
    svc.stop().await;
}

#[tokio::test]
async fn busy_callee_gives_100103_in_every_call_state() {
    let svc = CallService::start(None, |_| {}).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    let mut carol = svc.phone("carol").await;
    alice.call("bob").await;
    bob.expect(Req, "alice", Code::OK).await;
    // bob is ringing, alice is calling: both are busy.
    carol.call("bob").await;
    carol.expect(Reply, "bob", Code::BUSY).await;
    carol.call("alice").await;
    carol.expect(Reply, "alice", Code::BUSY).await;
    // ... and talking.
    bob.client.reply("alice", Code::OK).await.unwrap();
    carol.call("bob").await;
    carol.expect(Reply, "bob", Code::BUSY).await;
    bob.expect(Start, "alice", Code::OK).await;
    bob.assert_quiet().await;
    alice.expect(Reply, "bob", Code::OK).await;
    alice.expect(Start, "bob", Code::OK).await;
    alice.assert_quiet().await;
    svc.stop().await;
}

#[tokio::test]
async fn sender_with_a_call_gets_440_and_nothing_changes() {
    let svc = CallService::start(None, |_| {}).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    let mut carol = svc.phone("carol").await;
    alice.call("bob").await;
    bob.expect(Req, "alice", Code::OK).await;
    // Calling, again: 440.
    assert_eq!(
        alice.client.request("carol", 0, 0, "").await.unwrap(),
        Code::ALREADY_IN_CALL
    );
    assert_eq!(
        alice.client.request("bob", 0, 0, "").await.unwrap(),
        Code::ALREADY_IN_CALL
    );
    // Ringing: 440.
    assert_eq!(
        bob.client.request("carol", 0, 0, "").await.unwrap(),
        Code::ALREADY_IN_CALL
    );
    carol.assert_quiet().await;
    alice.assert_quiet().await;
    // The first call is untouched.
    bob.client.reply("alice", Code::OK).await.unwrap();
    alice.expect(Reply, "bob", Code::OK).await;
    alice.expect(Start, "bob", Code::OK).await;
    // Talking: 440.
    assert_eq!(
        alice.client.request("carol", 0, 0, "").await.unwrap(),
        Code::ALREADY_IN_CALL
    );
    svc.stop().await;
}

#[tokio::test]
async fn rejection_passes_its_code_to_both_sides() {
    let svc = CallService::start(None, |_| {}).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    for code in [Code::REJECTED, Code(555_123)] {
        alice.call("bob").await;
        bob.expect(Req, "alice", Code::OK).await;
        assert_eq!(bob.client.reply("alice", code).await.unwrap(), Code::OK);
        alice.expect(Reply, "bob", code).await;
        bob.expect(Finish, "alice", code).await;
    }
    // A callee's FINISH while ringing rejects with 100104.
    alice.call("bob").await;
    bob.expect(Req, "alice", Code::OK).await;
    bob.client.finish("alice").await.unwrap();
    alice.expect(Reply, "bob", Code::REJECTED).await;
    bob.expect(Finish, "alice", Code::REJECTED).await;
    svc.stop().await;
}

#[tokio::test]
async fn caller_cancel_gives_100101_by_finish_or_by_reply() {
    let svc = CallService::start(None, |_| {}).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    for by_reply in [false, true] {
        alice.call("bob").await;
        bob.expect(Req, "alice", Code::OK).await;
        let code = if by_reply {
            alice.client.reply("bob", Code::CANCELLED).await.unwrap()
        } else {
            alice.client.finish("bob").await.unwrap()
        };
        assert_eq!(code, Code::OK);
        alice.expect(Reply, "bob", Code::CANCELLED).await;
        bob.expect(Finish, "alice", Code::CANCELLED).await;
        // Both free at once.
        assert_eq!(
            user_state(&svc.admin().await, "bob").await,
            pb::UserState::Idle
        );
    }
    svc.stop().await;
}

#[tokio::test]
async fn ring_timeout_gives_100105() {
    let svc = CallService::start(None, |c| c.ring_timeout = Duration::from_millis(200)).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    alice.call("bob").await;
    bob.expect(Req, "alice", Code::OK).await;
    alice.expect(Reply, "bob", Code::NO_ANSWER).await;
    bob.expect(Finish, "alice", Code::NO_ANSWER).await;
    // A late answer matches nothing.
    assert_eq!(
        bob.client.reply("alice", Code::OK).await.unwrap(),
        Code::NOT_IN_CALL
    );
    svc.stop().await;
}

#[tokio::test]
async fn lost_connection_gives_100106_and_frees_both() {
    let svc = CallService::start(None, |_| {}).await;
    let admin = svc.admin().await;
    let mut alice = svc.phone("alice").await;

    // Callee drops while ringing: the waiting caller gets REPLY 100106.
    let mut bob = svc.phone("bob").await;
    alice.call("bob").await;
    bob.expect(Req, "alice", Code::OK).await;
    drop(bob);
    alice.expect(Reply, "bob", Code::CONNECTION_LOST).await;
    assert_eq!(user_state(&admin, "alice").await, pb::UserState::Idle);

    // Callee drops while talking: FINISH 100106.
    let mut bob = svc.phone("bob").await;
    alice.call("bob").await;
    bob.expect(Req, "alice", Code::OK).await;
    bob.client.reply("alice", Code::OK).await.unwrap();
    alice.expect(Reply, "bob", Code::OK).await;
    alice.expect(Start, "bob", Code::OK).await;
    drop(bob);
    alice.expect(Finish, "bob", Code::CONNECTION_LOST).await;

    // Caller drops while ringing: the callee gets FINISH 100106.
    let mut bob = svc.phone("bob").await;
    alice.call("bob").await;
    bob.expect(Req, "alice", Code::OK).await;
    drop(alice);
    bob.expect(Finish, "alice", Code::CONNECTION_LOST).await;
    assert_eq!(user_state(&admin, "alice").await, pb::UserState::Offline);
    assert_eq!(user_state(&admin, "bob").await, pb::UserState::Idle);
    assert!(admin.calls().await.unwrap().is_empty());
    svc.stop().await;
}

#[tokio::test]
async fn reply_or_finish_without_a_call_gives_100107() {
    let svc = CallService::start(None, |_| {}).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    assert_eq!(alice.client.finish("bob").await.unwrap(), Code::NOT_IN_CALL);
    assert_eq!(
        alice.client.reply("bob", Code::OK).await.unwrap(),
        Code::NOT_IN_CALL
    );
    // In a call, but naming somebody else.
    alice.call("bob").await;
    bob.expect(Req, "alice", Code::OK).await;
    assert_eq!(
        bob.client.reply("carol", Code::OK).await.unwrap(),
        Code::NOT_IN_CALL
    );
    assert_eq!(
        user_state(&svc.admin().await, "bob").await,
        pb::UserState::Ringing
    );
    alice.assert_quiet().await;
    svc.stop().await;
}

#[tokio::test]
async fn bad_controls_get_a_clear_code_and_the_stream_stays_open() {
    let svc = CallService::start(None, |_| {}).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    let raw = |event_type: i32, peer: &str, user_str: String| client_sdk::Control {
        event_type,
        peer: peer.into(),
        user_str,
        ..Default::default()
    };
    let cases = [
        (raw(1, "alice", String::new()), Code::INVALID_ARGUMENT),
        (raw(1, "", String::new()), Code::INVALID_ARGUMENT),
        (raw(1, "bob", "x".repeat(4097)), Code::INVALID_ARGUMENT),
        (raw(9, "bob", String::new()), Code::INVALID_ARGUMENT),
        (raw(0, "bob", String::new()), Code::INVALID_ARGUMENT),
        (raw(3, "bob", String::new()), Code::INVALID_ARGUMENT),
        (
            raw(1, &"b".repeat(129), String::new()),
            Code::INVALID_ARGUMENT,
        ),
    ];
    for (control, want) in cases {
        let r = alice.client.control(control.clone()).await.unwrap();
        assert_eq!(r.code, want, "{control:?}");
        assert!(!r.message.is_empty());
    }
    bob.assert_quiet().await;
    // The stream still works, and the limit itself is fine.
    let r = alice
        .client
        .control(raw(1, "bob", "x".repeat(4096)))
        .await
        .unwrap();
    assert_eq!(r.code, Code::OK);
    bob.expect(Req, "alice", Code::OK).await;
    // A caller cannot accept its own call; a second REQUEST is 440.
    assert_eq!(
        alice.client.reply("bob", Code::OK).await.unwrap(),
        Code::NOT_ALLOWED
    );
    assert_eq!(
        alice.client.request("bob", 0, 0, "").await.unwrap(),
        Code::ALREADY_IN_CALL
    );
    bob.client.reply("alice", Code::OK).await.unwrap();
    alice.expect(Reply, "bob", Code::OK).await;
    alice.expect(Start, "bob", Code::OK).await;
    // REPLY after START.
    assert_eq!(
        bob.client.reply("alice", Code::OK).await.unwrap(),
        Code::NOT_ALLOWED
    );
    svc.stop().await;
}

#[tokio::test]
async fn glare_ends_in_one_call_and_one_busy_reply() {
    for approval in [false, true] {
        let business = Business::start(&[]).await;
        let url = approval.then_some(business.url.as_str());
        let svc = CallService::start(url, |_| {}).await;
        let mut alice = svc.phone("alice").await;
        let mut bob = svc.phone("bob").await;
        let (a, b) = tokio::join!(
            alice.client.request("bob", 0, 0, ""),
            bob.client.request("alice", 0, 0, "")
        );
        assert_eq!((a.unwrap(), b.unwrap()), (Code::OK, Code::OK));
        // The user whose REQUEST came second hears BUSY and is rung by the
        // other; the other hears nothing until the answer.
        let first = tokio::select! {
            e = alice.next() => (e, true),
            e = bob.next() => (e, false),
        };
        let (callee, caller, first) = match first {
            (e, true) => (&mut alice, &mut bob, e),
            (e, false) => (&mut bob, &mut alice, e),
        };
        let second = callee.next().await;
        let mut got = vec![(first.kind, first.code), (second.kind, second.code)];
        got.sort_by_key(|(k, _)| *k as u8);
        assert_eq!(got, vec![(Req, Code::OK), (Reply, Code::BUSY)]);
        caller.assert_quiet().await;
        let caller_id = caller.user.clone();
        assert_eq!(
            callee.client.reply(&caller_id, Code::OK).await.unwrap(),
            Code::OK
        );
        callee.expect(Start, &caller_id, Code::OK).await;
        caller.expect(Reply, &callee.user.clone(), Code::OK).await;
        assert_eq!(svc.admin().await.calls().await.unwrap().len(), 1);
        svc.stop().await;
        business.stop().await;
    }
}

#[tokio::test]
async fn business_refusal_code_reaches_the_caller_unchanged() {
    let business = Business::start(&[("mallory", 777_001)]).await;
    let mut hook = business.log();
    let svc = CallService::start(Some(&business.url), |_| {}).await;
    let mut mallory = svc.phone("mallory").await;
    let mut bob = svc.phone("bob").await;
    let call_id = mallory.call("bob").await;
    mallory.expect(Reply, "bob", Code(777_001)).await;
    // The callee never hears of it.
    bob.assert_quiet().await;
    let notices = hook.call(&call_id, 2).await;
    assert_eq!((notices[1].event_type, notices[1].error_code), (2, 777_001));
    assert_eq!(notices[1].initiator, pb::Initiator::Business as i32);
    assert_eq!(
        user_state(&svc.admin().await, "bob").await,
        pb::UserState::Idle
    );
    svc.stop().await;
    business.stop().await;
}

/// An address where nothing listens.
async fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    url
}

#[tokio::test]
async fn business_slower_than_the_deadline_is_answered_by_the_failure_policy() {
    let url = start_silent_hook().await;
    let deadline = Duration::from_millis(300);
    let svc = CallService::start(Some(&url), |c| c.approval_deadline = deadline).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    let began = Instant::now();
    alice.call("bob").await;
    alice.expect(Reply, "bob", Code::BUSINESS_UNAVAILABLE).await;
    let took = began.elapsed();
    assert!(took >= deadline, "answered before the deadline: {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "the deadline was not kept: {took:?}"
    );
    bob.assert_quiet().await;
    svc.stop().await;

    // Policy "allow": the call rings instead.
    let svc = CallService::start(Some(&url), |c| {
        c.approval_deadline = deadline;
        c.approval_failure_policy = call_service::business::FailurePolicy::Allow;
    })
    .await;
    let alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    alice.call("bob").await;
    bob.expect(Req, "alice", Code::OK).await;
    svc.stop().await;
}

#[tokio::test]
async fn business_down_is_answered_by_the_failure_policy() {
    let url = closed_port().await;
    let svc = CallService::start(Some(&url), |c| {
        c.approval_deadline = Duration::from_millis(500)
    })
    .await;
    let mut alice = svc.phone("alice").await;
    alice.call("bob-is-not-needed").await;
    // Offline is decided before approval; call somebody online.
    alice
        .expect(Reply, "bob-is-not-needed", Code::OFFLINE)
        .await;
    let mut bob = svc.phone("bob").await;
    alice.call("bob").await;
    alice.expect(Reply, "bob", Code::BUSINESS_UNAVAILABLE).await;
    bob.assert_quiet().await;
    svc.stop().await;
}

#[tokio::test]
async fn forced_finish_in_every_state() {
    let url = start_silent_hook().await;
    // Approving (the hook never answers within this generous deadline).
    let svc = CallService::start(Some(&url), |c| {
        c.approval_deadline = Duration::from_secs(60)
    })
    .await;
    let admin = svc.admin().await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    alice.call("bob").await;
    let r = admin
        .hang_up("alice", 123_456, "prepaid minutes used up")
        .await
        .unwrap();
    assert_eq!(r.code, 0);
    let e = alice.expect(Reply, "bob", Code(123_456)).await;
    assert_eq!(e.user_str, "prepaid minutes used up");
    bob.assert_quiet().await;
    assert_eq!(user_state(&admin, "alice").await, pb::UserState::Idle);
    svc.stop().await;

    let business = Business::start(&[]).await;
    let svc = CallService::start(Some(&business.url), |_| {}).await;
    let admin = svc.admin().await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    // No call.
    assert_eq!(
        admin.hang_up("alice", 1, "").await.unwrap().code,
        Code::NOT_IN_CALL.0
    );
    // Ringing: caller REPLY, callee FINISH, both with the code.
    alice.call("bob").await;
    bob.expect(Req, "alice", Code::OK).await;
    assert_eq!(admin.hang_up("bob", 200_777, "").await.unwrap().code, 0);
    alice.expect(Reply, "bob", Code(200_777)).await;
    bob.expect(Finish, "alice", Code(200_777)).await;
    // Ringing, code 0: a REPLY 0 would mean "accepted", so TERMINATED.
    alice.call("bob").await;
    bob.expect(Req, "alice", Code::OK).await;
    admin.hang_up("alice", 0, "").await.unwrap();
    alice.expect(Reply, "bob", Code::TERMINATED).await;
    bob.expect(Finish, "alice", Code::TERMINATED).await;
    // Talking: FINISH to both.
    alice.call("bob").await;
    bob.expect(Req, "alice", Code::OK).await;
    bob.client.reply("alice", Code::OK).await.unwrap();
    alice.expect(Reply, "bob", Code::OK).await;
    alice.expect(Start, "bob", Code::OK).await;
    bob.expect(Start, "alice", Code::OK).await;
    assert_eq!(admin.hang_up("alice", 200_888, "").await.unwrap().code, 0);
    alice.expect(Finish, "bob", Code(200_888)).await;
    bob.expect(Finish, "alice", Code(200_888)).await;
    assert_eq!(user_state(&admin, "bob").await, pb::UserState::Idle);
    // A malformed admin control changes nothing.
    assert_eq!(
        admin.hang_up("", 1, "").await.unwrap().code,
        Code::INVALID_ARGUMENT.0
    );
    svc.stop().await;
    business.stop().await;
}

#[tokio::test]
async fn every_device_rings_and_the_first_answer_wins() {
    let svc = CallService::start(None, |_| {}).await;
    let admin = svc.admin().await;
    let mut alice = svc.phone("alice").await;
    let mut bob_phone = svc.phone("bob").await;
    let mut bob_laptop = svc.phone("bob").await;
    assert_eq!(admin.user_state("bob").await.unwrap().connections, 2);

    alice.call("bob").await;
    bob_phone.expect(Req, "alice", Code::OK).await;
    bob_laptop.expect(Req, "alice", Code::OK).await;
    assert_eq!(
        bob_laptop.client.reply("alice", Code::OK).await.unwrap(),
        Code::OK
    );
    bob_phone
        .expect(Finish, "alice", Code::ANSWERED_ELSEWHERE)
        .await;
    let room = bob_laptop.expect(Start, "alice", Code::OK).await.param;
    alice.expect(Reply, "bob", Code::OK).await;
    assert_eq!(alice.expect(Start, "bob", Code::OK).await.param, room);
    // The other device's late answer matches nothing, and changes nothing.
    assert_eq!(
        bob_phone.client.reply("alice", Code::OK).await.unwrap(),
        Code::NOT_IN_CALL
    );
    // A user with a call on any device is busy, and cannot call out.
    assert_eq!(
        bob_phone.client.request("carol", 0, 0, "").await.unwrap(),
        Code::ALREADY_IN_CALL
    );
    let mut carol = svc.phone("carol").await;
    carol.call("bob").await;
    carol.expect(Reply, "bob", Code::BUSY).await;
    // Only the device in the call can hang it up.
    assert_eq!(
        bob_phone.client.finish("alice").await.unwrap(),
        Code::NOT_IN_CALL
    );
    bob_laptop.client.finish("alice").await.unwrap();
    alice.expect(Finish, "bob", Code::OK).await;
    bob_laptop.expect(Finish, "alice", Code::OK).await;
    bob_phone.assert_quiet().await;

    // A rejection on one device ends the ringing on the others too.
    alice.call("bob").await;
    bob_phone.expect(Req, "alice", Code::OK).await;
    bob_laptop.expect(Req, "alice", Code::OK).await;
    bob_phone
        .client
        .reply("alice", Code::REJECTED)
        .await
        .unwrap();
    bob_phone.expect(Finish, "alice", Code::REJECTED).await;
    bob_laptop
        .expect(Finish, "alice", Code::ANSWERED_ELSEWHERE)
        .await;
    alice.expect(Reply, "bob", Code::REJECTED).await;

    // A device that connects while a call rings, rings too.
    alice.call("bob").await;
    bob_phone.expect(Req, "alice", Code::OK).await;
    bob_laptop.expect(Req, "alice", Code::OK).await;
    let mut bob_tablet = svc.phone("bob").await;
    bob_tablet.expect(Req, "alice", Code::OK).await;
    // One ringing device leaving does not end the call.
    drop(bob_phone);
    bob_tablet.client.reply("alice", Code::OK).await.unwrap();
    bob_laptop
        .expect(Finish, "alice", Code::ANSWERED_ELSEWHERE)
        .await;
    alice.expect(Reply, "bob", Code::OK).await;
    svc.stop().await;
}

#[tokio::test]
async fn room_ids_are_unique_among_live_calls() {
    let svc = CallService::start(None, |_| {}).await;
    let mut rooms = std::collections::HashSet::new();
    let mut phones = Vec::new();
    for i in 0..10 {
        let caller = svc.phone(&format!("caller{i}")).await;
        let mut callee = svc.phone(&format!("callee{i}")).await;
        caller.call(&callee.user.clone()).await;
        callee.expect(Req, &caller.user.clone(), Code::OK).await;
        callee.client.reply(&caller.user, Code::OK).await.unwrap();
        let room = callee
            .expect(Start, &caller.user.clone(), Code::OK)
            .await
            .param;
        assert!(rooms.insert(room), "room {room} given twice");
        phones.push((caller, callee));
    }
    svc.stop().await;
}

#[tokio::test]
async fn a_stream_without_identity_is_refused() {
    let svc = CallService::start(None, |c| c.dev_identity = false).await;
    let err = client_sdk::Client::connect(
        svc.client_url.clone(),
        client_sdk::Credentials::dev_user("alice"),
    )
    .await
    .unwrap_err();
    match err {
        client_sdk::Error::Refused(s) => assert_eq!(s.code(), tonic::Code::Unauthenticated),
        other => panic!("expected UNAUTHENTICATED, got {other}"),
    }
    assert_eq!(
        user_state(&svc.admin().await, "alice").await,
        pb::UserState::Offline
    );
    svc.stop().await;
}
