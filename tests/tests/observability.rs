//! Health, reflection, metrics and logs of the running binaries, checked
//! with third-party clients (Python grpcio-health-checking,
//! grpcio-reflection, prometheus-client; see tests/python/probe.py), and
//! NOT_SERVING while draining.

use std::time::Duration;

use client_sdk::{Code, EventKind};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use videocall_tests::process::{Proc, binaries, field, workspace};
use videocall_tests::{CallService, PATIENCE, Phone};

fn python() -> String {
    std::env::var("VIDEOCALL_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs the probe; it must succeed.
async fn probe(args: &[&str]) -> String {
    let script = workspace().join("tests/python/probe.py");
    let out = tokio::process::Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .await
        .expect("run probe.py (see scripts/test.sh for its Python packages)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "probe {args:?} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test]
async fn health_reflection_metrics_and_json_logs_of_the_binaries() {
    let bins = binaries();
    let mut business = Proc::start(
        &bins.join("business-service"),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--no-records",
        ],
    );
    let line = business.line("business-service listening").await;
    let hook = field(&line, "hook");
    let business_metrics = format!("http://{}/metrics", field(&line, "metrics"));
    let mut calls = Proc::start_logged(
        &bins.join("call-service"),
        &[
            "--client-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--business-url",
            &format!("http://{hook}"),
            "--dev-identity",
            "--log-format",
            "json",
        ],
    );
    let line = calls.line("call-service listening").await;
    let client = field(&line, "client");
    let admin = field(&line, "admin");
    let call_metrics = format!("http://{}/metrics", field(&line, "metrics"));

    // Health and reflection on every port, through third-party clients.
    probe(&[
        "health",
        &client,
        "-",
        "videocall.v1.CallService",
        "videocall.v1.CallAdmin",
    ])
    .await;
    probe(&[
        "health",
        &admin,
        "-",
        "videocall.v1.CallService",
        "videocall.v1.CallAdmin",
    ])
    .await;
    probe(&["health", &hook, "-", "videocall.v1.BusinessHook"]).await;
    probe(&[
        "reflection",
        &client,
        "videocall.v1.CallService",
        "grpc.health.v1.Health",
    ])
    .await;
    probe(&[
        "reflection",
        &admin,
        "videocall.v1.CallAdmin",
        "grpc.health.v1.Health",
    ])
    .await;
    probe(&[
        "reflection",
        &hook,
        "videocall.v1.BusinessHook",
        "grpc.health.v1.Health",
    ])
    .await;

    // A call, and what the metrics say during and after it.
    let url = format!("http://{client}");
    let connect = |user: &'static str| {
        let url = url.clone();
        async move {
            let (client, events) =
                client_sdk::Client::connect(url, client_sdk::Credentials::dev_user(user))
                    .await
                    .expect("connect");
            Phone {
                user: user.into(),
                client,
                events,
            }
        }
    };
    let mut alice = connect("alice").await;
    let mut bob = connect("bob").await;
    let call_id = alice.call("bob").await;
    bob.expect(EventKind::Request, "alice", Code::OK).await;
    bob.client.reply("alice", Code::OK).await.expect("reply");
    alice.expect(EventKind::Reply, "bob", Code::OK).await;
    alice.expect(EventKind::Start, "bob", Code::OK).await;
    bob.expect(EventKind::Start, "alice", Code::OK).await;
    probe(&[
        "metrics",
        &call_metrics,
        "videocall_connected_devices=2",
        "videocall_calls{phase=talking}=1",
        "videocall_calls{phase=ringing}=0",
        "videocall_call_setup_seconds_count=1",
        "videocall_approval_seconds_count=1",
        "videocall_controls_total{result=0}=2",
    ])
    .await;
    alice.client.finish("bob").await.expect("finish");
    alice.expect(EventKind::Finish, "bob", Code::OK).await;
    bob.expect(EventKind::Finish, "alice", Code::OK).await;
    assert_eq!(
        alice.client.finish("bob").await.expect("finish"),
        Code::NOT_IN_CALL
    );
    // A forced hang-up while ringing.
    alice.call("bob").await;
    bob.expect(EventKind::Request, "alice", Code::OK).await;
    let admin_api = business_service::admin::Admin::connect(format!("http://{admin}"))
        .await
        .expect("admin");
    assert_eq!(
        admin_api
            .hang_up("bob", 200_100, "")
            .await
            .expect("hang up")
            .code,
        0
    );
    alice.expect(EventKind::Reply, "bob", Code(200_100)).await;
    probe(&[
        "metrics",
        &call_metrics,
        "videocall_calls{phase=talking}=0",
        "videocall_call_outcomes_total{code=0,event=FINISH}=1",
        "videocall_controls_total{result=100107}=1",
        "videocall_notices_dropped_total=0",
        "videocall_forced_finishes_total{result=0}=1",
        // The business service's own code is not a `ResultCode`: counted
        // with every other such code (its own metrics have it by code).
        "videocall_call_outcomes_total{code=other,event=REPLY}=1",
    ])
    .await;
    probe(&[
        "metrics",
        &business_metrics,
        "business_decisions_total{code=0}=2",
        "business_notices_total{event=REQUEST}=2",
    ])
    .await;

    // JSON logs: each event of the call logged once, with call id, both
    // users and the code.
    let pid = calls.child.id().expect("pid").to_string();
    tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    let status = tokio::time::timeout(PATIENCE, calls.child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert!(status.success());
    let mut events = Vec::new();
    let stderr = calls.stderr.as_mut().expect("captured stderr");
    while let Some(line) = stderr.next_line().await.expect("read stderr") {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["message"] == "call event" && v["call_id"] == call_id.as_str() {
            assert_eq!(
                (v["caller"].as_str(), v["callee"].as_str()),
                (Some("alice"), Some("bob")),
                "{v}"
            );
            assert!(v["code"].is_u64(), "{v}");
            events.push(v["event"].as_str().unwrap_or_default().to_owned());
        }
    }
    assert_eq!(events, ["REQUEST", "REPLY", "START", "FINISH"]);
    business.child.kill().await.expect("kill business");
}

#[tokio::test]
async fn health_turns_not_serving_while_draining() {
    let svc = CallService::start(None, |c| c.drain_time = Duration::from_millis(300)).await;
    let channel = tonic::transport::Endpoint::from_shared(svc.admin_url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("status").expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let stopping = tokio::spawn(svc.stop());
    let next = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .expect("in time")
        .expect("status");
    assert_eq!(
        next.expect("a status").status,
        ServingStatus::NotServing as i32
    );
    stopping.await.expect("stopped cleanly");
}
