//! The browser edge over real sockets: the `Session` protocol as JSON text
//! frames on a WebSocket, with the gRPC edge's semantics: `Connected`
//! first, one result per control in order, the same events, identity from
//! the first frame, origins, bad input, resume; and the web phone's files.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use business_service::tokens::{self, Claims};
use client_sdk::{Code, EventKind};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use videocall_tests::web::{self, WebDevice};
use videocall_tests::{CallService, phone_at, user_state};

/// A call service with its web edge on a free port.
async fn with_web(tweak: impl Fn(&mut call_service::Config)) -> (CallService, String) {
    let svc = CallService::start(None, |c| {
        c.web_addr = Some("127.0.0.1:0".parse().expect("addr"));
        tweak(c);
    })
    .await;
    let url = svc.nodes()[0].web_url.clone().expect("a web edge");
    (svc, url)
}

fn kind(e: &Value) -> &str {
    e["eventType"].as_str().unwrap_or("")
}

#[tokio::test]
async fn two_browsers_place_a_call_over_websockets_as_grpc_clients_do() {
    let (svc, url) = with_web(|_| {}).await;
    let (mut alice, connected) = web::device(&url, "alice").await;
    assert_eq!(connected["userId"], "alice");
    assert!(
        connected["resumeToken"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    let (mut bob, _) = web::device(&url, "bob").await;

    let (r, before) = alice
        .control(
            "REQUEST",
            "bob",
            json!({ "userStr": "hello bob", "flags": 3 }),
        )
        .await;
    assert!(before.is_empty(), "{before:?}");
    assert!(r.get("code").is_none(), "taken (code 0 is left out): {r}");
    let call_id = r["callId"].as_str().expect("a call id").to_owned();
    let ring = bob.event().await;
    assert_eq!(
        (
            kind(&ring),
            ring["peerUserId"].as_str(),
            ring["userStr"].as_str()
        ),
        ("EVENT_TYPE_REQUEST", Some("alice"), Some("hello bob"))
    );
    assert_eq!(ring["callId"], call_id.as_str());

    // One result per control, in order: a control refused at once and one
    // taken, back to back.
    bob.send(json!({ "control": { "seq": 100, "eventType": "EVENT_TYPE_REQUEST", "peerUserId": "bob" } }))
        .await;
    bob.send(json!({ "control": { "seq": 101, "eventType": "EVENT_TYPE_REPLY", "peerUserId": "alice" } }))
        .await;
    let first = bob.next().await.expect("open");
    assert_eq!(first["result"]["seq"], "100", "{first}");
    assert_eq!(first["result"]["code"], Code::INVALID_ARGUMENT.0);
    let second = bob.next().await.expect("open");
    assert_eq!(second["result"]["seq"], "101", "{second}");
    assert!(second["result"].get("code").is_none(), "{second}");

    let reply = alice.event().await;
    assert_eq!(kind(&reply), "EVENT_TYPE_REPLY");
    assert!(reply.get("errorCode").is_none(), "accepted: {reply}");
    let start_a = alice.event().await;
    let start_b = bob.event().await;
    assert_eq!(kind(&start_a), "EVENT_TYPE_START");
    assert_eq!(kind(&start_b), "EVENT_TYPE_START");
    assert!(start_a["param"].as_u64().is_some_and(|room| room > 0));
    assert_eq!(start_a["param"], start_b["param"], "one room");

    let (r, _) = alice.control("FINISH", "bob", json!({})).await;
    assert!(r.get("code").is_none(), "{r}");
    let fin = bob.event().await;
    assert_eq!(kind(&fin), "EVENT_TYPE_FINISH");
    assert!(fin.get("errorCode").is_none(), "a normal hang-up: {fin}");
    let admin = svc.admin().await;
    assert_eq!(
        user_state(&admin, "alice").await,
        videocall_proto::v1::UserState::Idle
    );
    assert_eq!(
        user_state(&admin, "bob").await,
        videocall_proto::v1::UserState::Idle
    );
    svc.stop().await;
}

/// A browser and a gRPC client of the same user are two devices of one
/// user: both ring, the first answer wins, the other hears
/// ANSWERED_ELSEWHERE.
#[tokio::test]
async fn a_browser_and_an_sdk_device_of_one_user_both_ring_and_the_first_answer_wins() {
    let (svc, url) = with_web(|_| {}).await;
    let (mut alice_web, _) = web::device(&url, "alice").await;
    let mut alice_sdk = phone_at(&svc.client_url, "alice").await;
    let mut bob = phone_at(&svc.client_url, "bob").await;
    let call_id = bob.call("alice").await;
    let ring = alice_web.event().await;
    assert_eq!(
        (kind(&ring), ring["callId"].as_str()),
        ("EVENT_TYPE_REQUEST", Some(call_id.as_str()))
    );
    alice_sdk.expect(EventKind::Request, "bob", Code::OK).await;

    let (r, _) = alice_web
        .control("REPLY", "bob", json!({ "errorCode": 0 }))
        .await;
    assert!(r.get("code").is_none(), "{r}");
    alice_sdk
        .expect(EventKind::Finish, "bob", Code::ANSWERED_ELSEWHERE)
        .await;
    bob.expect(EventKind::Reply, "alice", Code::OK).await;
    let start = bob.expect(EventKind::Start, "alice", Code::OK).await;
    let web_start = alice_web.event().await;
    assert_eq!(kind(&web_start), "EVENT_TYPE_START");
    assert_eq!(web_start["param"], json!(start.room_id().expect("a room")));

    // The browser closes its socket: the device is gone, and its call ends
    // for the peer as a gRPC device's would (100106).
    alice_web.send_raw(Message::Close(None)).await;
    bob.expect(EventKind::Finish, "alice", Code::CONNECTION_LOST)
        .await;
    svc.stop().await;
}

/// Bad input ends that socket only, with 4003 and what was wrong; the
/// user's state does not change and other sockets go on.
#[tokio::test]
async fn bad_frames_end_only_their_socket_with_a_clear_reason() {
    let (svc, url) = with_web(|_| {}).await;
    let (mut bob, _) = web::device(&url, "bob").await;
    let cases: Vec<(Message, &str)> = vec![
        (
            Message::text("{not json"),
            "not a videocall.v1.ClientMessage in JSON",
        ),
        (
            Message::text(r#"{"control":{"seq":1,"peer":"bob"}}"#),
            "unrecognized field name 'peer'",
        ),
        (
            Message::text(r#"{"control":{"seq":"one"}}"#),
            "not a videocall.v1.ClientMessage in JSON",
        ),
        (
            Message::binary(vec![0x0a, 0x00]),
            "binary frames are not read",
        ),
        (
            Message::text(format!(
                r#"{{"control":{{"seq":1,"userStr":"{}"}}}}"#,
                "x".repeat(call_service::web::MAX_FRAME_BYTES)
            )),
            "a frame over 65536 bytes",
        ),
    ];
    for (frame, why) in cases {
        let (mut alice, _) = web::device(&url, "alice").await;
        alice.send_raw(frame).await;
        let (code, reason) = alice.next().await.expect_err("closed");
        assert_eq!(code, 4003, "INVALID_ARGUMENT: {reason}");
        assert!(reason.contains(why), "{why}: {reason}");
    }
    // A hello that is not one, and a first frame that is not text.
    let mut d = web::open(&url, None).await.expect("upgraded");
    d.send(json!({ "devUserId": "alice", "resume": "x" })).await;
    let (code, reason) = d.next().await.expect_err("closed");
    assert_eq!(code, 4003, "{reason}");
    assert!(reason.contains("videocall.v1.WebHello"), "{reason}");

    // Alice's sockets are gone and nothing else changed; bob's socket
    // still works.
    let admin = svc.admin().await;
    assert_eq!(
        user_state(&admin, "alice").await,
        videocall_proto::v1::UserState::Offline
    );
    let (r, _) = bob.control("FINISH", "nobody", json!({})).await;
    assert_eq!(r["code"], Code::NOT_IN_CALL.0);
    svc.stop().await;
}

/// The upgrade itself: only for the subprotocol, only from allowed origins.
#[tokio::test]
async fn a_socket_needs_the_subprotocol_and_an_allowed_origin() {
    let (svc, url) = with_web(|c| c.web_origins = vec!["https://app.example".into()]).await;
    let host = url.trim_start_matches("http://");
    assert_eq!(
        web::open(&url, Some("https://evil.example")).await.err(),
        Some(403)
    );
    assert!(web::open(&url, Some("https://app.example")).await.is_ok());
    assert!(
        web::open(&url, Some(&format!("http://{host}")))
            .await
            .is_ok(),
        "its own page"
    );
    assert!(web::open(&url, None).await.is_ok(), "not a browser");
    // Without the subprotocol.
    let ws_url = format!("ws://{host}{}", call_service::web::SESSION_PATH);
    match tokio_tungstenite::connect_async(ws_url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 400),
        other => panic!("upgraded without the subprotocol: {other:?}"),
    }
    svc.stop().await;
}

const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

fn token(user: &str, exp: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("time")
        .as_secs();
    let claims = Claims {
        sub: user.into(),
        iat: now,
        exp: now + exp,
        nbf: None,
    };
    tokens::hs256(&claims, SECRET.as_bytes()).expect("sign")
}

/// With tokens configured the first frame's token is checked exactly as
/// gRPC metadata is: a forged or missing one closes with 4016, a user name
/// is not taken for one, a good one names the user.
#[tokio::test]
async fn the_first_frames_token_is_checked_as_grpc_metadata_is() {
    let (svc, url) = with_web(|c| {
        c.dev_identity = false;
        c.jwt_secret = Some(SECRET.into());
    })
    .await;
    let forged = tokens::hs256(
        &Claims {
            sub: "alice".into(),
            iat: 0,
            exp: u64::MAX / 2,
            nbf: None,
        },
        b"another-secret-of-at-least-32-bytes!!",
    )
    .expect("sign");
    for hello in [
        json!({ "token": forged }),
        json!({ "devUserId": "alice" }),
        json!({ "token": "garbage" }),
        json!({}),
    ] {
        let mut d = web::open(&url, None).await.expect("upgraded");
        d.send(hello.clone()).await;
        let (code, reason) = d.next().await.expect_err("refused");
        assert_eq!(code, 4016, "{hello}: UNAUTHENTICATED ({reason})");
    }
    let mut d = web::open(&url, None).await.expect("upgraded");
    d.send(json!({ "token": token("alice", 3600), "devUserId": "mallory" }))
        .await;
    let connected = d.next().await.expect("open");
    assert_eq!(connected["connected"]["userId"], "alice", "{connected}");
    assert!(
        connected["connected"]["expiresAtMs"].as_str().is_some(),
        "{connected}"
    );
    // A refresh on the socket, as on gRPC.
    d.send(json!({ "refresh": { "seq": 9, "token": token("alice", 7200) } }))
        .await;
    let r = d.next().await.expect("open");
    assert_eq!(r["refreshResult"]["seq"], "9", "{r}");
    assert!(r["refreshResult"].get("code").is_none(), "{r}");
    d.send(json!({ "refresh": { "seq": 10, "token": token("bob", 7200) } }))
        .await;
    let r = d.next().await.expect("open");
    assert_eq!(r["refreshResult"]["code"], Code::TOKEN_REFUSED.0, "{r}");
    svc.stop().await;
}

/// A browser whose connection breaks mid-call comes back with its resume
/// token: the call goes on and the peer notices nothing.
#[tokio::test]
async fn a_browser_whose_socket_breaks_resumes_its_call() {
    let (svc, url) = with_web(|c| c.limits.resume_grace = Duration::from_secs(10)).await;
    let (mut alice, connected) = web::device(&url, "alice").await;
    let resume = connected["resumeToken"].as_str().expect("token").to_owned();
    let device = connected["connectionId"].clone();
    let mut bob = phone_at(&svc.client_url, "bob").await;
    let (r, _) = alice.control("REQUEST", "bob", json!({})).await;
    assert!(r.get("code").is_none(), "{r}");
    bob.expect(EventKind::Request, "alice", Code::OK).await;
    alice.drop_connection();
    // Bob answers while alice is away: what she missed waits for her.
    bob.client.reply("alice", Code::OK).await.expect("reply");
    bob.expect(EventKind::Start, "alice", Code::OK).await;

    let mut again: WebDevice = web::open(&url, None).await.expect("upgraded");
    again
        .send(json!({ "devUserId": "alice", "resumeToken": resume }))
        .await;
    let connected = again.next().await.expect("open");
    assert_eq!(connected["connected"]["resumed"], true, "{connected}");
    assert_eq!(connected["connected"]["connectionId"], device);
    let kinds = [again.event().await, again.event().await];
    assert_eq!(kind(&kinds[0]), "EVENT_TYPE_REPLY");
    assert_eq!(kind(&kinds[1]), "EVENT_TYPE_START");
    let (r, _) = again.control("FINISH", "bob", json!({})).await;
    assert!(r.get("code").is_none(), "{r}");
    bob.expect(EventKind::Finish, "alice", Code::OK).await;
    bob.assert_quiet().await;
    svc.stop().await;
}

/// The web phone's files are served, with a policy that keeps the page to
/// its own origin.
#[tokio::test]
async fn the_web_phone_is_served_at_the_web_address() {
    let (svc, url) = with_web(|_| {}).await;
    for (path, kind, has) in [
        ("/", "text/html", "phone.js"),
        ("/phone.js", "text/javascript", "videocall.v1.json"),
        ("/phone.css", "text/css", "video"),
    ] {
        let (status, headers, body) = get(&url, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            headers.contains(&format!("content-type: {kind}")),
            "{path}: {headers}"
        );
        assert!(
            headers.contains("content-security-policy: default-src 'self'"),
            "{headers}"
        );
        assert!(body.contains(has), "{path}");
    }
    svc.stop().await;
}

/// A plain HTTP/1.1 GET: status, headers (lowercase), body.
async fn get(url: &str, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, head.to_lowercase(), body.to_owned())
}

/// The web listener accepts with the node's accept limits: a socket that
/// sends nothing is closed after the handshake timeout, and one peer's
/// connections beyond its limit are closed at once while its sessions go on.
#[tokio::test]
async fn the_web_listener_closes_silent_sockets_and_one_peers_excess() {
    use tokio::io::AsyncReadExt;
    let (svc, url) = with_web(|c| {
        c.limits.handshake_timeout = Duration::from_millis(300);
        c.limits.max_connections_per_peer = 2;
    })
    .await;
    let host = url.trim_start_matches("http://").to_owned();
    let closed = |mut s: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the server never closed the connection");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    };
    closed(
        tokio::net::TcpStream::connect(&host)
            .await
            .expect("connect"),
    )
    .await;

    let (mut a, _) = web::device(&url, "alice").await;
    let (_b, _) = web::device(&url, "bob").await;
    closed(
        tokio::net::TcpStream::connect(&host)
            .await
            .expect("connect"),
    )
    .await;
    // The two sessions are untouched.
    let (r, _) = a.control("FINISH", "nobody", json!({})).await;
    assert_eq!(r["code"], Code::NOT_IN_CALL.0, "{r}");
    svc.stop().await;
}
