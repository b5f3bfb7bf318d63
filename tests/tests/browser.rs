//! The web phone in real browsers: headless Chromium (Debian's packages)
//! with a fake camera, driven through Selenium (`tests/python/browser.py`),
//! against a call service with its web edge. Two pages call each other and
//! talk over WebRTC (frames decoded on both sides), a page and an SDK client
//! call each other both ways, and a page cancels and rejects.
//!
//! Needs `chromium`, `chromium-driver` and a Python with
//! `tests/python/requirements.txt` in `VIDEOCALL_PYTHON`:
//! `./scripts/test.sh` installs them.

use std::time::Duration;

use client_sdk::{Code, EventKind};
use serde_json::{Value, json};
use videocall_proto::v1::UserState;
use videocall_tests::browser::Browsers;
use videocall_tests::process::workspace;
use videocall_tests::{CallService, Proxy, phone_at, user_state};

async fn with_web() -> (CallService, String) {
    with_web_and(|_| {}).await
}

async fn with_web_and(tweak: impl Fn(&mut call_service::Config)) -> (CallService, String) {
    let svc = CallService::start(None, |c| {
        c.web_addr = Some("127.0.0.1:0".parse().expect("addr"));
        tweak(c);
    })
    .await;
    let url = svc.nodes()[0].web_url.clone().expect("a web edge");
    (svc, url)
}

/// The page's last event, as (type, peer, code).
fn last(events: &[Value]) -> (String, String, u64) {
    let e = events.last().expect("an event");
    (
        e["type"].as_str().unwrap_or_default().to_owned(),
        e["peer"].as_str().unwrap_or_default().to_owned(),
        e["code"].as_u64().unwrap_or(u64::MAX),
    )
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["type"].as_str()).collect()
}

#[tokio::test]
async fn two_web_phones_call_talk_over_webrtc_and_hang_up() {
    let (svc, url) = with_web().await;
    let mut browsers = Browsers::start().await;
    browsers.open("alice", &url).await.sign_in_as("alice").await;
    browsers.open("bob", &url).await.sign_in_as("bob").await;

    browsers.page("alice").dial("bob", "Hello Bob!").await;
    let mut bob = browsers.page("bob");
    bob.wait_state("ringing").await;
    assert_eq!(bob.text("caller").await, "alice");
    assert_eq!(bob.text("caller-message").await, "Hello Bob!");
    // The caller's video offer came in the REQUEST's user string.
    assert_eq!(
        bob.eval("return Boolean(phone.call.offer)").await,
        json!(true)
    );
    bob.click("answer").await;

    for name in ["alice", "bob"] {
        let mut page = browsers.page(name);
        page.wait_state("talking").await;
        // Media flows between the browsers: the peer connection is up and
        // the other side's fake camera frames are decoded here.
        page.wait("return phone.ice === 'connected'").await;
        page.wait("return phone.framesDecoded().then((n) => n > 0)")
            .await;
    }
    let room_a = browsers.page("alice").eval("return phone.room").await;
    let room_b = browsers.page("bob").eval("return phone.room").await;
    assert!(room_a.as_u64().is_some_and(|r| r > 0), "{room_a}");
    assert_eq!(room_a, room_b, "one room");
    let shots = workspace().join("target/screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    browsers
        .page("bob")
        .screenshot(&shots.join("web-phone-talking.png"))
        .await;

    browsers.page("alice").click("hangup").await;
    let mut bob = browsers.page("bob");
    bob.wait_state("idle").await;
    let events = bob.events().await;
    assert_eq!(types(&events), ["REQUEST", "START", "FINISH"]);
    assert_eq!(last(&events), ("FINISH".into(), "alice".into(), 0));
    assert_eq!(
        bob.eval("return phone.pc").await,
        Value::Null,
        "media closed"
    );
    let mut alice = browsers.page("alice");
    alice.wait_state("idle").await;
    // The one who hangs up hears its own FINISH too, as on gRPC.
    assert_eq!(types(&alice.events().await), ["REPLY", "START", "FINISH"]);
    let admin = svc.admin().await;
    assert_eq!(user_state(&admin, "alice").await, UserState::Idle);
    assert_eq!(user_state(&admin, "bob").await, UserState::Idle);
    browsers.quit().await;
    svc.stop().await;
}

#[tokio::test]
async fn a_web_phone_and_an_sdk_client_call_each_other_both_ways() {
    let (svc, url) = with_web().await;
    let mut browsers = Browsers::start().await;
    browsers.open("web", &url).await.sign_in_as("carol").await;
    let mut sdk = phone_at(&svc.client_url, "dave").await;

    // SDK → browser: the page rings with the SDK's text, answers; the SDK
    // hangs up.
    let call_id = sdk.call("carol").await;
    let mut web = browsers.page("web");
    web.wait_state("ringing").await;
    assert_eq!(web.text("caller-message").await, "dave calling");
    web.click("answer").await;
    sdk.expect(EventKind::Reply, "carol", Code::OK).await;
    let start = sdk.expect(EventKind::Start, "carol", Code::OK).await;
    assert_eq!(start.call_id, call_id);
    web.wait_state("talking").await;
    assert_eq!(
        web.eval("return phone.room").await,
        json!(start.room_id().expect("a room"))
    );
    assert_eq!(sdk.client.finish("carol").await.expect("finish"), Code::OK);
    sdk.expect(EventKind::Finish, "carol", Code::OK).await;
    web.wait_state("idle").await;
    assert_eq!(
        last(&web.events().await),
        ("FINISH".into(), "dave".into(), 0)
    );

    // Browser → SDK: the SDK sees the page's text (and its video offer) in
    // the user string, and rejects; the page shows why.
    web.dial("dave", "Hi Dave").await;
    let ring = sdk.expect(EventKind::Request, "carol", Code::OK).await;
    let user: Value = serde_json::from_str(&ring.user_str).expect("the page sends JSON");
    assert_eq!(user["text"], "Hi Dave");
    assert!(user["offer"].as_str().is_some_and(|o| !o.is_empty()));
    assert!(ring.user_str.len() <= 4096);
    assert_eq!(
        sdk.client
            .reply("carol", Code::REJECTED)
            .await
            .expect("reply"),
        Code::OK
    );
    web.wait_state("idle").await;
    assert_eq!(
        last(&web.events().await),
        ("REPLY".into(), "dave".into(), u64::from(Code::REJECTED.0))
    );
    browsers.quit().await;
    svc.stop().await;
}

#[tokio::test]
async fn a_web_phone_cancels_a_call_and_rejects_one() {
    let (svc, url) = with_web().await;
    let mut browsers = Browsers::start().await;
    browsers.open("erin", &url).await.sign_in_as("erin").await;
    browsers.open("frank", &url).await.sign_in_as("frank").await;

    // The caller hangs up while it rings: a cancel.
    browsers.page("erin").dial("frank", "ring once").await;
    browsers.page("frank").wait_state("ringing").await;
    browsers.page("erin").wait_state("calling").await;
    browsers.page("erin").click("hangup").await;
    let mut frank = browsers.page("frank");
    frank.wait_state("idle").await;
    assert_eq!(
        last(&frank.events().await),
        ("FINISH".into(), "erin".into(), u64::from(Code::CANCELLED.0))
    );
    let mut erin = browsers.page("erin");
    erin.wait("return phone.events.some((e) => e.type === 'REPLY')")
        .await;
    assert_eq!(
        last(&erin.events().await),
        ("REPLY".into(), "frank".into(), u64::from(Code::CANCELLED.0))
    );

    // The callee rejects.
    browsers.page("erin").dial("frank", "again").await;
    let mut frank = browsers.page("frank");
    frank.wait_state("ringing").await;
    frank.click("reject").await;
    frank.wait_state("idle").await;
    let mut erin = browsers.page("erin");
    erin.wait_state("idle").await;
    assert_eq!(
        last(&erin.events().await),
        ("REPLY".into(), "frank".into(), u64::from(Code::REJECTED.0))
    );
    let admin = svc.admin().await;
    assert_eq!(user_state(&admin, "erin").await, UserState::Idle);
    assert_eq!(user_state(&admin, "frank").await, UserState::Idle);
    browsers.quit().await;
    svc.stop().await;
}

/// The page's connection breaks mid-call (a network blip: the TCP
/// connection dies without a close frame): the page reconnects by itself
/// with its resume token, the call goes on, and the peer sees nothing.
#[tokio::test]
async fn a_web_phone_whose_connection_breaks_reconnects_and_its_call_goes_on() {
    // The harness's grace window is short (tests of the window's end);
    // this one gives the page time to come back.
    let (svc, url) = with_web_and(|c| c.limits.resume_grace = Duration::from_secs(10)).await;
    let proxy = Proxy::start(url.trim_start_matches("http://")).await;
    let mut browsers = Browsers::start().await;
    let mut web = browsers.open("web", &format!("{}/", proxy.url)).await;
    web.sign_in_as("grace").await;
    let mut sdk = phone_at(&svc.client_url, "heidi").await;
    sdk.call("grace").await;
    web.wait_state("ringing").await;
    web.click("answer").await;
    sdk.expect(EventKind::Reply, "grace", Code::OK).await;
    sdk.expect(EventKind::Start, "grace", Code::OK).await;
    web.wait_state("talking").await;

    proxy.cut();
    web.wait("return phone.resumes === 1 && phone.state === 'talking'")
        .await;
    sdk.assert_quiet().await;
    assert_eq!(types(&web.events().await), ["REQUEST", "START"]);

    // The resumed stream carries the call: a hang-up from the peer arrives.
    assert_eq!(sdk.client.finish("grace").await.expect("finish"), Code::OK);
    web.wait_state("idle").await;
    assert_eq!(
        last(&web.events().await),
        ("FINISH".into(), "heidi".into(), 0)
    );
    browsers.quit().await;
    svc.stop().await;
}
