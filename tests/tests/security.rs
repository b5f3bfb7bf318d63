//! Secure by default, over real connections: tokens, the admin credential,
//! TLS, limits, malformed input, and calls ended cleanly on shutdown.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use business_service::admin::{Admin, AdminAccess};
use business_service::tokens::{self, Claims};
use client_sdk::{Client, Code, Credentials, EventKind};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::net::TcpListener;
use videocall_proto::v1 as pb;
use videocall_tests::phone_with;
use videocall_tests::{CallService, PATIENCE, talking, user_state};

const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";
const ADMIN: &str = "the-admin-secret-of-at-least-32-bytes";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("time")
        .as_secs()
}

fn claims(user: &str, exp: u64) -> Claims {
    Claims {
        sub: user.into(),
        iat: now(),
        exp,
        nbf: None,
    }
}

fn token(user: &str) -> String {
    tokens::hs256(&claims(user, now() + 3600), SECRET.as_bytes()).expect("sign")
}

/// A call service that verifies HS256 tokens and guards its admin API.
async fn secured(tweak: impl Fn(&mut call_service::Config)) -> CallService {
    CallService::start(None, |c| {
        c.dev_identity = false;
        c.jwt_secret = Some(SECRET.into());
        c.admin_token = Some(ADMIN.into());
        tweak(c);
    })
    .await
}

async fn admin(svc: &CallService) -> Admin {
    let access = AdminAccess {
        token: Some(ADMIN.into()),
        ..Default::default()
    };
    Admin::connect_with(svc.admin_url.clone(), access)
        .await
        .expect("admin")
}

fn refused_with(
    result: Result<(Client, client_sdk::Events), client_sdk::Error>,
    code: tonic::Code,
) {
    match result {
        Err(client_sdk::Error::Refused(s)) => assert_eq!(s.code(), code, "{s:?}"),
        Err(e) => panic!("expected {code:?}, got {e}"),
        Ok(_) => panic!("expected {code:?}, got a connection"),
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_before_anything_changes() {
    let svc = secured(|_| {}).await;
    let url = svc.client_url.clone();
    let other = "another-secret-that-is-32-bytes-long";
    let cases = [
        (
            "forged",
            tokens::hs256(&claims("alice", now() + 600), other.as_bytes()).expect("sign"),
        ),
        (
            "expired",
            tokens::hs256(&claims("alice", now() - 600), SECRET.as_bytes()).expect("sign"),
        ),
        (
            "not yet valid",
            tokens::hs256(
                &Claims {
                    nbf: Some(now() + 300),
                    ..claims("alice", now() + 600)
                },
                SECRET.as_bytes(),
            )
            .expect("sign"),
        ),
        ("malformed", "not-a-jwt".into()),
        (
            "bad subject",
            tokens::hs256(&claims("", now() + 600), SECRET.as_bytes()).expect("sign"),
        ),
    ];
    for (what, t) in cases {
        let r = Client::connect(url.clone(), Credentials::Bearer(t)).await;
        match r {
            Err(client_sdk::Error::Refused(s)) => {
                assert_eq!(s.code(), tonic::Code::Unauthenticated, "{what}: {s:?}")
            }
            Err(e) => panic!("{what}: {e}"),
            Ok(_) => panic!("{what}: a connection"),
        }
    }
    // No token, and the development header (which means nothing here).
    refused_with(
        Client::connect(url.clone(), Credentials::dev_user("alice")).await,
        tonic::Code::Unauthenticated,
    );
    let admin = admin(&svc).await;
    assert_eq!(user_state(&admin, "alice").await, pb::UserState::Offline);
    // A good token: the user is the token's subject.
    let alice = phone_with(&url, "alice", Credentials::Bearer(token("alice"))).await;
    assert_eq!(
        admin.user_state("alice").await.expect("state").connections,
        1
    );
    drop(alice);
    svc.stop().await;
}

#[tokio::test]
async fn es256_tokens_are_checked_with_the_public_key_only() {
    let key = KeyPair::generate().expect("key");
    let dir = tempfile::tempdir().expect("tempdir");
    let public = dir.path().join("jwt.pub.pem");
    std::fs::write(&public, key.public_key_pem()).expect("write");
    let svc = CallService::start(None, |c| {
        c.dev_identity = false;
        c.jwt_public_key = Some(public.clone());
    })
    .await;
    let signed = tokens::signed(
        &claims("alice", now() + 600),
        key.serialize_pem().as_bytes(),
    )
    .expect("sign");
    phone_with(&svc.client_url, "alice", Credentials::Bearer(signed)).await;
    // The public key used as an HMAC secret (algorithm confusion) is refused.
    let confused = tokens::hs256(
        &claims("mallory", now() + 600),
        key.public_key_pem().as_bytes(),
    )
    .expect("sign");
    refused_with(
        Client::connect(svc.client_url.clone(), Credentials::Bearer(confused)).await,
        tonic::Code::Unauthenticated,
    );
    svc.stop().await;
}

#[tokio::test]
async fn a_token_expiring_mid_call_ends_that_stream() {
    let svc = secured(|c| c.jwt_leeway = Duration::ZERO).await;
    let url = svc.client_url.clone();
    let short = tokens::hs256(&claims("alice", now() + 2), SECRET.as_bytes()).expect("sign");
    let mut alice = phone_with(&url, "alice", Credentials::Bearer(short)).await;
    let mut bob = phone_with(&url, "bob", Credentials::Bearer(token("bob"))).await;
    talking(&mut alice, &mut bob).await;
    // At expiry the server ends alice's stream, saying why; bob's call ends.
    let end = tokio::time::timeout(PATIENCE, alice.events.next())
        .await
        .expect("in time");
    assert!(end.is_none(), "{end:?}");
    let reason = alice.events.end_reason().expect("a reason");
    assert_eq!(
        (reason.code(), reason.message()),
        (tonic::Code::Unauthenticated, "token expired")
    );
    bob.expect(EventKind::Finish, "alice", Code::CONNECTION_LOST)
        .await;
    svc.stop().await;
}

#[tokio::test]
async fn nobody_can_end_or_answer_another_users_call() {
    let svc = secured(|_| {}).await;
    let url = svc.client_url.clone();
    let mut alice = phone_with(&url, "alice", Credentials::Bearer(token("alice"))).await;
    let mut bob = phone_with(&url, "bob", Credentials::Bearer(token("bob"))).await;
    let mallory = phone_with(&url, "mallory", Credentials::Bearer(token("mallory"))).await;
    alice.call("bob").await;
    bob.expect(EventKind::Request, "alice", Code::OK).await;
    // mallory tries to answer for bob, and to hang up for either side.
    assert_eq!(
        mallory
            .client
            .reply("alice", Code::OK)
            .await
            .expect("reply"),
        Code::NOT_IN_CALL
    );
    assert_eq!(
        mallory.client.finish("alice").await.expect("finish"),
        Code::NOT_IN_CALL
    );
    assert_eq!(
        mallory.client.finish("bob").await.expect("finish"),
        Code::NOT_IN_CALL
    );
    alice.assert_quiet().await;
    bob.assert_quiet().await;
    assert_eq!(
        user_state(&admin(&svc).await, "bob").await,
        pb::UserState::Ringing
    );
    svc.stop().await;
}

#[tokio::test]
async fn the_admin_api_wants_its_own_credential() {
    let svc = secured(|_| {}).await;
    let alice_token = token("alice");
    for access in [
        AdminAccess::default(),
        AdminAccess {
            token: Some(alice_token.clone()),
            ..Default::default()
        },
        AdminAccess {
            token: Some("a-wrong-admin-secret".into()),
            ..Default::default()
        },
    ] {
        let a = Admin::connect_with(svc.admin_url.clone(), access)
            .await
            .expect("connect");
        let err = a.calls().await.expect_err("refused");
        assert!(
            matches!(err, business_service::admin::AdminError::Status(ref s) if s.code() == tonic::Code::Unauthenticated),
            "{err}"
        );
    }
    assert!(admin(&svc).await.calls().await.expect("calls").is_empty());
    // The client port does not serve the admin API at all.
    let access = AdminAccess {
        token: Some(ADMIN.into()),
        ..Default::default()
    };
    let on_client_port = Admin::connect_with(svc.client_url.clone(), access)
        .await
        .expect("connect");
    let err = on_client_port.calls().await.expect_err("not served");
    assert!(
        matches!(err, business_service::admin::AdminError::Status(ref s) if s.code() == tonic::Code::Unimplemented),
        "{err}"
    );
    svc.stop().await;

    // An admin API beyond loopback without a credential does not start.
    let client = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let open_admin = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let mut config = call_service::Config::for_tests(None);
    config.admin_token = None;
    let listeners = call_service::Listeners {
        client,
        admin: open_admin,
        metrics: None,
        web: None,
    };
    let err = call_service::serve(listeners, config, std::future::pending())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("--admin-token"), "{err}");
}

#[tokio::test]
async fn floods_beyond_each_limit_affect_only_whoever_floods() {
    let svc = secured(|c| {
        c.limits.controls_per_second = 2;
        c.limits.control_burst = 5;
        c.limits.max_devices_per_user = 2;
        c.limits.max_connections = 4;
    })
    .await;
    let url = svc.client_url.clone();
    let alice = phone_with(&url, "alice", Credentials::Bearer(token("alice"))).await;
    let bob = phone_with(&url, "bob", Credentials::Bearer(token("bob"))).await;

    // Controls: 30 at once; past the burst they are RATE_LIMITED, the
    // connection stays, and bob is not limited.
    let results =
        futures_util::future::join_all((0..30).map(|_| alice.client.finish("nobody"))).await;
    let limited = results
        .iter()
        .filter(|r| matches!(r, Ok(c) if *c == Code::RATE_LIMITED))
        .count();
    let answered = results
        .iter()
        .filter(|r| matches!(r, Ok(c) if *c == Code::NOT_IN_CALL))
        .count();
    assert!(
        limited >= 20 && answered >= 5 && limited + answered == 30,
        "limited {limited}, answered {answered}"
    );
    assert_eq!(
        bob.client.finish("nobody").await.expect("bob"),
        Code::NOT_IN_CALL
    );

    // Devices per user: alice's third device is refused; bob's second is fine.
    let _alice2 = phone_with(&url, "alice", Credentials::Bearer(token("alice"))).await;
    refused_with(
        Client::connect(url.clone(), Credentials::Bearer(token("alice"))).await,
        tonic::Code::ResourceExhausted,
    );
    let _bob2 = phone_with(&url, "bob", Credentials::Bearer(token("bob"))).await;
    // Connections per node: four are held; a fifth is refused.
    refused_with(
        Client::connect(url.clone(), Credentials::Bearer(token("carol"))).await,
        tonic::Code::ResourceExhausted,
    );
    svc.stop().await;
}

#[tokio::test]
async fn oversized_messages_and_pending_approvals_are_bounded() {
    // A hook that never answers keeps approvals pending.
    let hook_url = videocall_tests::start_silent_hook().await;
    let svc = CallService::start(Some(&hook_url), |c| {
        c.limits.max_pending_approvals = 1;
        c.limits.max_message_bytes = 8 * 1024;
        c.approval_deadline = Duration::from_secs(30);
    })
    .await;
    // Approvals in flight are a node's own limit: both callers on one node.
    let alice = videocall_tests::phone_at(&svc.client_url, "alice").await;
    let _bob = svc.phone("bob").await;
    let carol = videocall_tests::phone_at(&svc.client_url, "carol").await;
    let _dave = svc.phone("dave").await;
    alice.call("bob").await;
    assert_eq!(
        carol
            .client
            .request("dave", 0, 0, "")
            .await
            .expect("request"),
        Code::OVERLOADED
    );
    assert_eq!(
        user_state(&svc.admin().await, "dave").await,
        pb::UserState::Idle
    );
    // A message over the size limit ends only the sender's stream.
    let mut mallory = svc.phone("mallory").await;
    let big = client_sdk::Control {
        event_type: pb::EventType::Request as i32,
        peer: "dave".into(),
        user_str: "x".repeat(20 * 1024),
        ..Default::default()
    };
    assert!(mallory.client.control(big).await.is_err());
    assert!(
        tokio::time::timeout(PATIENCE, mallory.events.next())
            .await
            .expect("ends")
            .is_none()
    );
    assert_eq!(
        carol.client.finish("nobody").await.expect("carol"),
        Code::NOT_IN_CALL
    );
    svc.stop().await;
}

#[tokio::test]
async fn live_calls_end_with_terminated_when_the_service_stops() {
    let svc = CallService::start(None, |_| {}).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    talking(&mut alice, &mut bob).await;
    svc.stop().await;
    alice
        .expect(EventKind::Finish, "bob", Code::TERMINATED)
        .await;
    bob.expect(EventKind::Finish, "alice", Code::TERMINATED)
        .await;
    // The stream ends with UNAVAILABLE: the SDK tries to reconnect, then
    // gives up (nobody restarted the service).
    let end = tokio::time::timeout(PATIENCE * 3, alice.events.next())
        .await
        .expect("ends");
    assert!(end.is_none());
    assert_eq!(
        alice.events.end_reason().expect("a reason").code(),
        tonic::Code::Unavailable
    );
}

/// A CA, and a certificate it signed for localhost.
fn certificates() -> (String, String, String, CertifiedIssuer<'static, KeyPair>) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("params");
    let cert = params.signed_by(&key, &ca).expect("cert");
    (ca.pem(), cert.pem(), key.serialize_pem(), ca)
}

#[tokio::test]
async fn tls_on_both_listeners_and_mutual_tls_for_admin() {
    let (ca_pem, cert_pem, key_pem, ca) = certificates();
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let (cert, key, ca_file) = (
        write("cert.pem", &cert_pem),
        write("key.pem", &key_pem),
        write("ca.pem", &ca_pem),
    );
    let svc = secured(|c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
        c.admin_client_ca = Some(ca_file.clone());
    })
    .await;
    let https = |url: &str| url.replace("http://127.0.0.1", "https://localhost");

    // Clients over TLS, trusting the test CA.
    let (alice, _events) = Client::connect_tls(
        https(&svc.client_url),
        Credentials::Bearer(token("alice")),
        &ca_pem,
    )
    .await
    .expect("tls");
    assert_eq!(alice.user_id(), "alice");
    // Plain text to a TLS port fails.
    assert!(
        Client::connect(svc.client_url.clone(), Credentials::Bearer(token("bob")))
            .await
            .is_err()
    );

    // Admin: the token alone is not enough, a client certificate is needed too.
    let access = AdminAccess {
        token: Some(ADMIN.into()),
        ca_pem: Some(ca_pem.clone().into_bytes()),
        identity: None,
    };
    let no_cert = match Admin::connect_with(https(&svc.admin_url), access.clone()).await {
        Ok(a) => a.calls().await.is_err(),
        Err(_) => true,
    };
    assert!(no_cert, "admin without a client certificate was let in");
    let admin_key = KeyPair::generate().expect("key");
    let admin_cert = CertificateParams::new(vec!["operator".to_owned()])
        .expect("params")
        .signed_by(&admin_key, &ca)
        .expect("cert");
    let access = AdminAccess {
        identity: Some((
            admin_cert.pem().into_bytes(),
            admin_key.serialize_pem().into_bytes(),
        )),
        ..access
    };
    let admin = Admin::connect_with(https(&svc.admin_url), access)
        .await
        .expect("mtls admin");
    assert_eq!(
        admin.user_state("alice").await.expect("state").connections,
        1
    );
    svc.stop().await;
}

#[tokio::test]
async fn malformed_frames_end_only_that_stream() {
    let svc = CallService::start(None, |_| {}).await;
    let mut alice = svc.phone("alice").await;
    let mut bob = svc.phone("bob").await;
    // Bytes that are not protobuf, sent by a third-party client (Python).
    let python = std::env::var("VIDEOCALL_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = videocall_tests::process::workspace().join("tests/python/probe.py");
    let addr = svc.client_url.trim_start_matches("http://").to_owned();
    let out = tokio::process::Command::new(python)
        .arg(probe)
        .args(["garbage", &addr, "mallory"])
        .output()
        .await
        .expect("run probe.py (see scripts/test.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("garbage: INTERNAL") || text.contains("garbage: INVALID_ARGUMENT"),
        "{text}"
    );
    // Everybody else carries on.
    alice.call("bob").await;
    bob.expect(EventKind::Request, "alice", Code::OK).await;
    assert_eq!(
        user_state(&svc.admin().await, "mallory").await,
        pb::UserState::Offline
    );
    alice.client.finish("bob").await.expect("finish");
    alice.expect(EventKind::Reply, "bob", Code::CANCELLED).await;
    svc.stop().await;
}

/// Hardening findings 5 and 9: a validly signed `exp` of 2^63−1 neither
/// panics nor ends the stream; subjects and peer ids with invisible or
/// reordering characters are refused.
#[tokio::test]
async fn claims_at_the_edge_of_time_and_look_alike_ids() {
    let svc = secured(|_| {}).await;
    let url = svc.client_url.clone();
    let forever =
        tokens::hs256(&claims("alice", i64::MAX as u64), SECRET.as_bytes()).expect("sign");
    let mut alice = phone_with(&url, "alice", Credentials::Bearer(forever)).await;
    let mut bob = phone_with(&url, "bob", Credentials::Bearer(token("bob"))).await;
    // The stream lives on and works.
    talking(&mut alice, &mut bob).await;
    assert_eq!(alice.client.finish("bob").await.expect("finish"), Code::OK);
    bob.expect(EventKind::Finish, "alice", Code::OK).await;

    for sub in [
        "bob\u{2028}",
        "\u{202E}bob",
        "b\u{200B}ob",
        "\u{FEFF}bob",
        "bob smith",
    ] {
        let t = tokens::hs256(&claims(sub, now() + 600), SECRET.as_bytes()).expect("sign");
        refused_with(
            Client::connect(url.clone(), Credentials::Bearer(t)).await,
            tonic::Code::Unauthenticated,
        );
        let code = alice.client.request(sub, 0, 0, "").await.expect("request");
        assert_eq!(code, Code::INVALID_ARGUMENT, "{sub:?}");
    }
    svc.stop().await;
}

/// Credentials that mint a token of `user` living `life` seconds on each
/// ask, counting the asks; asks for which `fail` holds give no token.
fn minting(
    user: &'static str,
    life: u64,
    fail: impl Fn(usize) -> bool + Send + Sync + 'static,
) -> (Credentials, tokio::sync::watch::Receiver<usize>) {
    let (asked, asks) = tokio::sync::watch::channel(0usize);
    let credentials = Credentials::provider(move || {
        let mut n = 0;
        asked.send_modify(|c| {
            *c += 1;
            n = *c;
        });
        let token = if fail(n) {
            Err(format!("the token backend is down (ask {n})"))
        } else {
            tokens::hs256(&claims(user, now() + life), SECRET.as_bytes()).map_err(|e| e.to_string())
        };
        async move { token }
    });
    (credentials, asks)
}

/// Waits until the provider has been asked `n` times.
async fn asked(asks: &mut tokio::sync::watch::Receiver<usize>, n: usize) {
    tokio::time::timeout(PATIENCE * 2, asks.wait_for(|c| *c >= n))
        .await
        .unwrap_or_else(|_| panic!("the token provider was not asked {n} times"))
        .expect("provider alive");
}

/// A call service whose tokens are checked to the second and refreshed
/// `ahead` before expiry.
async fn refreshing(ahead: u64) -> CallService {
    secured(|c| {
        c.jwt_leeway = Duration::ZERO;
        c.refresh_ahead = Duration::from_secs(ahead);
        c.limits.resume_grace = Duration::from_secs(20);
    })
    .await
}

#[tokio::test]
async fn a_call_outlives_its_tokens_by_refreshes_and_across_a_resume() {
    let svc = refreshing(2).await;
    let proxy = videocall_tests::Proxy::start(svc.client_url.trim_start_matches("http://")).await;
    // Tokens of 2 to 3 seconds (`exp` is in whole seconds).
    let (credentials, mut asks) = minting("alice", 3, |_| false);
    let mut alice = phone_with(&proxy.url, "alice", credentials).await;
    let mut bob = phone_with(
        &svc.next_client_url(),
        "bob",
        Credentials::Bearer(token("bob")),
    )
    .await;
    talking(&mut alice, &mut bob).await;
    // The connect's token and two refreshes, on the live stream.
    asked(&mut asks, 3).await;
    // The network drops alice's connection: the SDK reconnects with a new
    // token (an ask), resumes, and goes on refreshing on the new stream.
    proxy.cut();
    asked(&mut asks, 6).await;
    // Several token lives later the call is on, and bob saw nothing.
    let admin = admin(&svc).await;
    assert_eq!(user_state(&admin, "alice").await, pb::UserState::Talking);
    bob.assert_quiet().await;
    assert_eq!(alice.client.finish("bob").await.expect("finish"), Code::OK);
    alice.expect(EventKind::Finish, "bob", Code::OK).await;
    bob.expect(EventKind::Finish, "alice", Code::OK).await;
    svc.stop().await;
}

#[tokio::test]
async fn a_failing_token_provider_is_asked_again_and_the_call_goes_on() {
    // Tokens of 4 to 5 s, asked for halfway; the first refresh fails.
    let svc = refreshing(5).await;
    let (credentials, mut asks) = minting("alice", 5, |n| n == 2);
    let mut alice = phone_with(&svc.next_client_url(), "alice", credentials).await;
    let mut bob = phone_with(
        &svc.next_client_url(),
        "bob",
        Credentials::Bearer(token("bob")),
    )
    .await;
    talking(&mut alice, &mut bob).await;
    // The failed ask, the one after backoff, and the next refresh: past the
    // first token's expiry.
    asked(&mut asks, 4).await;
    bob.assert_quiet().await;
    assert_eq!(
        user_state(&admin(&svc).await, "alice").await,
        pb::UserState::Talking
    );
    assert_eq!(bob.client.finish("alice").await.expect("finish"), Code::OK);
    alice.expect(EventKind::Finish, "bob", Code::OK).await;
    svc.stop().await;
}

#[tokio::test]
async fn a_provider_failing_until_expiry_ends_the_stream_with_the_reason() {
    let svc = refreshing(2).await;
    let (credentials, mut asks) = minting("alice", 3, |n| n > 1);
    let mut alice = phone_with(&svc.next_client_url(), "alice", credentials).await;
    let mut bob = phone_with(
        &svc.next_client_url(),
        "bob",
        Credentials::Bearer(token("bob")),
    )
    .await;
    talking(&mut alice, &mut bob).await;
    let end = tokio::time::timeout(PATIENCE, alice.events.next())
        .await
        .expect("in time");
    assert!(end.is_none(), "{end:?}");
    let reason = alice.events.end_reason().expect("a reason");
    assert_eq!(
        (reason.code(), reason.message()),
        (tonic::Code::Unauthenticated, "token expired")
    );
    // It was asked again (with backoff) before the end.
    assert!(*asks.borrow_and_update() >= 3, "asks: {}", *asks.borrow());
    bob.expect(EventKind::Finish, "alice", Code::CONNECTION_LOST)
        .await;
    svc.stop().await;
}

/// A raw stream with a token, for what the SDK never sends.
struct RawStream {
    tx: tokio::sync::mpsc::Sender<pb::ClientMessage>,
    inbound: tonic::Streaming<pb::ServerMessage>,
    connected: pb::Connected,
}

impl RawStream {
    async fn open(url: &str, token: &str) -> Self {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
        let mut inbound = pb::call_service_client::CallServiceClient::new(channel)
            .session(request)
            .await
            .expect("session")
            .into_inner();
        let connected = match inbound.message().await.expect("message") {
            Some(pb::ServerMessage {
                kind: Some(pb::server_message::Kind::Connected(c)),
            }) => c,
            other => panic!("expected Connected, got {other:?}"),
        };
        Self {
            tx,
            inbound,
            connected,
        }
    }

    async fn refresh(&self, seq: u64, token: &str) {
        let msg = pb::ClientMessage {
            kind: Some(pb::client_message::Kind::Refresh(pb::TokenRefresh {
                seq,
                token: token.into(),
            })),
        };
        self.tx.send(msg).await.expect("send");
    }

    /// The next message, or the status the stream ended with.
    async fn next(&mut self) -> Result<pb::server_message::Kind, tonic::Status> {
        match tokio::time::timeout(PATIENCE, self.inbound.message())
            .await
            .expect("a message in time")
        {
            Ok(Some(pb::ServerMessage { kind: Some(kind) })) => Ok(kind),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(status) => Err(status),
        }
    }
}

#[tokio::test]
async fn refreshed_tokens_are_checked_as_at_connect_and_refusals_change_nothing() {
    let svc = refreshing(2).await;
    let url = svc.next_client_url();
    let exp = now() + 4;
    let first = tokens::hs256(&claims("alice", exp), SECRET.as_bytes()).expect("sign");
    let mut raw = RawStream::open(&url, &first).await;
    assert_eq!(raw.connected.expires_at_ms, exp * 1000);

    let key = KeyPair::generate().expect("key");
    let bad = [
        // Another user's.
        tokens::hs256(&claims("bob", now() + 600), SECRET.as_bytes()).expect("sign"),
        // Expired.
        tokens::hs256(&claims("alice", now() - 600), SECRET.as_bytes()).expect("sign"),
        // Forged: another secret.
        tokens::hs256(
            &claims("alice", now() + 600),
            b"another-secret-of-at-least-32-bytes!!",
        )
        .expect("sign"),
        // The wrong algorithm (ES256 where HS256 is configured).
        tokens::signed(
            &claims("alice", now() + 600),
            key.serialize_pem().as_bytes(),
        )
        .expect("sign"),
        "not a token".to_owned(),
    ];
    for (seq, token) in (1..).zip(&bad) {
        raw.refresh(seq, token).await;
    }
    // Each refused in order, the expiry unchanged; the server asks for a
    // token (once) when 2 s are left.
    let mut refused = Vec::new();
    let mut due = 0;
    let status = loop {
        match raw.next().await {
            Ok(pb::server_message::Kind::RefreshResult(r)) => {
                assert_eq!(
                    (r.code, r.expires_at_ms),
                    (Code::TOKEN_REFUSED.0, exp * 1000),
                    "{r:?}"
                );
                assert!(!r.message.is_empty());
                refused.push(r.seq);
            }
            Ok(pb::server_message::Kind::RefreshDue(d)) => {
                assert_eq!(d.expires_at_ms, exp * 1000);
                due += 1;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(refused, [1, 2, 3, 4, 5]);
    assert_eq!(due, 1);
    // The stream lived until its own token's expiry, not a moment less.
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::Unauthenticated, "token expired")
    );
    assert!(
        SystemTime::now() >= UNIX_EPOCH + Duration::from_secs(exp),
        "ended before expiry"
    );

    // A good token moves the expiry.
    let mut raw = RawStream::open(&url, &token("alice")).await;
    let later = now() + 7200;
    let good = tokens::hs256(&claims("alice", later), SECRET.as_bytes()).expect("sign");
    raw.refresh(9, &good).await;
    match raw.next().await {
        Ok(pb::server_message::Kind::RefreshResult(r)) => {
            assert_eq!((r.seq, r.code, r.expires_at_ms), (9, 0, later * 1000));
        }
        other => panic!("expected a RefreshResult, got {other:?}"),
    }
    svc.stop().await;
}
