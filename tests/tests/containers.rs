//! The containers, run for real: images built from the repository's
//! Dockerfile on a local Debian bookworm base (no registry needed), the pair
//! started with `docker-compose up`, real clients calling in from the host
//! (approval, refusal, forced hang-up), the business-service container
//! restarted and its call records found again in its volume. And the
//! cluster (`docker-compose.cluster.yml`): Redis, three call-service nodes
//! and HAProxy, clients calling through HAProxy, the node container of a
//! talking user killed, the call going on through another node.
//!
//! Fails where no Docker engine answers: a test that cannot run never
//! passes.

use std::process::{Command, Output};
use std::time::Duration;

use client_sdk::{Code, EventKind};
use videocall_tests::process::{binaries, free_port, workspace};
use videocall_tests::web;
use videocall_tests::{phone_at, scrape_metrics, talking};

const BASE: &str = "videocall-base:bookworm";
/// The base of the Redis and HAProxy images: Debian's packages in it.
const OPS_BASE: &str = "videocall-ops:bookworm";
const CALL_IMAGE: &str = "videocall/call-service:test";
const BUSINESS_IMAGE: &str = "videocall/business-service:test";
const REDIS_IMAGE: &str = "videocall/redis:test";
const HAPROXY_IMAGE: &str = "videocall/haproxy:test";
const ADMIN_TOKEN: &str = "container-test-admin-secret-0123456789";

/// The container tests run one at a time: they build the same images from
/// the same staged binaries, and two compose projects at once would crowd
/// two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Fails the test where no Docker engine answers: a test that cannot run
/// never passes.
fn docker_or_fail() {
    let docker = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    assert!(
        docker.is_ok_and(|o| o.status.success()),
        "no Docker engine answers (`docker info` failed): the container test cannot run"
    );
}

/// Builds the images of the Dockerfile's `targets` (stage, tag) from the
/// local bases (as users would pull debian:bookworm-slim) and the binaries
/// cargo built on the host.
fn build_images(targets: &[(&str, &str)]) {
    let root = workspace();
    run(Command::new(root.join("scripts/docker-base.sh")).arg(BASE));
    if targets
        .iter()
        .any(|(t, _)| matches!(*t, "redis" | "haproxy"))
    {
        run(Command::new(root.join("scripts/docker-base.sh")).args([
            OPS_BASE,
            "redis-server",
            "haproxy",
        ]));
    }
    let bins = binaries();
    let staged = root.join("target/docker");
    std::fs::create_dir_all(&staged).expect("target/docker");
    for b in ["call-service", "business-service"] {
        std::fs::copy(bins.join(b), staged.join(b)).expect("stage binary");
    }
    for (target, tag) in targets {
        run(Command::new("docker").current_dir(&root).args([
            "build",
            "-q",
            "--build-arg",
            &format!("RUST_IMAGE={BASE}"),
            "--build-arg",
            &format!("RUNTIME_IMAGE={BASE}"),
            "--build-arg",
            &format!("OPS_IMAGE={OPS_BASE}"),
            "--target",
            target,
            "-t",
            tag,
            ".",
        ]));
    }
    // The builder stage's intermediate image is not needed any more.
    let _ = Command::new("docker")
        .args([
            "image",
            "prune",
            "-f",
            "--filter",
            "label=videocall.stage=builder",
        ])
        .output();
}

/// `docker-compose -p PROJECT [-f FILE]` with the test's images and ports;
/// brought down (volumes too) when dropped.
struct Compose {
    project: String,
    file: Option<&'static str>,
    env: Vec<(String, String)>,
}

impl Compose {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker-compose");
        c.current_dir(workspace()).args(["-p", &self.project]);
        if let Some(file) = self.file {
            c.args(["-f", file]);
        }
        c.args(args);
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    fn container(&self, service: &str) -> String {
        let out = run(&mut self.cmd(&["ps", "-q", service]));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits for the container's HEALTHCHECK to say healthy (Docker runs it
    /// every 5 s; look every 250 ms for at most 90 s).
    async fn healthy(&self, service: &str) {
        let id = self.container(service);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut status = String::new();
        for _ in 0..360 {
            tick.tick().await;
            let out = Command::new("docker")
                .args(["inspect", "-f", "{{.State.Health.Status}}", &id])
                .output()
                .expect("docker inspect");
            status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if status == "healthy" {
                return;
            }
        }
        let logs = Command::new("docker")
            .args(["logs", "--tail", "30", &id])
            .output()
            .expect("docker logs");
        panic!(
            "{service} is {status:?}, not healthy:\n{}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.cmd(&["down", "-v", "--remove-orphans"]).output();
    }
}

#[tokio::test]
async fn compose_up_calls_through_the_containers_and_keeps_records() {
    let _serial = SERIAL.lock().await;
    docker_or_fail();
    build_images(&[
        ("call-service", CALL_IMAGE),
        ("business-service", BUSINESS_IMAGE),
    ]);

    let (client_port, admin_port) = (free_port().await, free_port().await);
    let (metrics_port, business_metrics_port) = (free_port().await, free_port().await);
    let web_port = free_port().await;
    let compose = Compose {
        project: format!("videocalltest{}", std::process::id()),
        file: None,
        env: vec![
            ("VIDEOCALL_CALL_IMAGE".into(), CALL_IMAGE.into()),
            ("VIDEOCALL_BUSINESS_IMAGE".into(), BUSINESS_IMAGE.into()),
            ("VIDEOCALL_CLIENT_PORT".into(), client_port.to_string()),
            ("VIDEOCALL_ADMIN_PORT".into(), admin_port.to_string()),
            ("VIDEOCALL_METRICS_PORT".into(), metrics_port.to_string()),
            ("VIDEOCALL_WEB_PORT".into(), web_port.to_string()),
            (
                "VIDEOCALL_BUSINESS_METRICS_PORT".into(),
                business_metrics_port.to_string(),
            ),
            ("VIDEOCALL_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ],
    };
    run(&mut compose.cmd(&["up", "-d", "--no-build"]));
    compose.healthy("business-service").await;
    compose.healthy("call-service").await;

    // The web edge is published too: a browser's session opens through it.
    let (_web, connected) = web::device(&format!("http://127.0.0.1:{web_port}"), "carol").await;
    assert_eq!(connected["userId"], "carol", "{connected}");

    // Real clients on the host call through the containers.
    let url = format!("http://127.0.0.1:{client_port}");
    let mut alice = phone_at(&url, "alice").await;
    let mut bob = phone_at(&url, "bob").await;
    let mut mallory = phone_at(&url, "mallory").await;
    mallory.call("bob").await;
    mallory.expect(EventKind::Reply, "bob", Code(200_001)).await;
    let call_id = alice.call("bob").await;
    bob.expect(EventKind::Request, "alice", Code::OK).await;
    bob.client.reply("alice", Code::OK).await.expect("reply");
    alice.expect(EventKind::Reply, "bob", Code::OK).await;
    let room = alice.expect(EventKind::Start, "bob", Code::OK).await.param;
    assert_eq!(
        bob.expect(EventKind::Start, "alice", Code::OK).await.param,
        room
    );
    // Forced hang-up through the admin port (published on loopback).
    let url = format!("http://127.0.0.1:{admin_port}");
    let nobody = business_service::admin::Admin::connect(url.clone())
        .await
        .expect("admin");
    let refused = nobody
        .hang_up("alice", 1, "")
        .await
        .expect_err("no credential");
    assert!(
        refused.to_string().contains("Unauthenticated")
            || refused.to_string().contains("credential"),
        "{refused}"
    );
    let access = business_service::admin::AdminAccess {
        token: Some(ADMIN_TOKEN.into()),
        ..Default::default()
    };
    let admin = business_service::admin::Admin::connect_with(url, access)
        .await
        .expect("admin");
    assert_eq!(
        admin
            .hang_up("alice", 200_100, "time is up")
            .await
            .expect("hang up")
            .code,
        0
    );
    alice.expect(EventKind::Finish, "bob", Code(200_100)).await;
    bob.expect(EventKind::Finish, "alice", Code(200_100)).await;

    // The business service restarts; its records are still in the volume,
    // and the call is complete (notices it missed are delivered again).
    run(&mut compose.cmd(&["restart", "business-service"]));
    compose.healthy("business-service").await;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut csv = String::new();
    for _ in 0..120 {
        tick.tick().await;
        let out = compose
            .cmd(&[
                "exec",
                "-T",
                "business-service",
                "business-service",
                "records",
                "--csv",
                "recent",
            ])
            .output()
            .expect("records");
        csv = String::from_utf8_lossy(&out.stdout).into_owned();
        if csv
            .lines()
            .any(|l| l.starts_with(&call_id) && l.ends_with(",false,true"))
        {
            break;
        }
    }
    let record = csv
        .lines()
        .find(|l| l.starts_with(&call_id))
        .unwrap_or_else(|| panic!("no record of {call_id}:\n{csv}"));
    assert!(
        record.contains(",200100,business,") && record.ends_with(",false,true"),
        "{record}"
    );
    assert!(
        csv.lines()
            .any(|l| l.contains(",mallory,bob,") && l.contains(",200001,business,")),
        "{csv}"
    );
    // And calls still work after the restart.
    alice.call("bob").await;
    bob.expect(EventKind::Request, "alice", Code::OK).await;
}

/// One gauge or counter (summed over its labels) from a node's metrics
/// endpoint; `None` while the node does not answer.
async fn metric(port: u16, name: &str) -> Option<f64> {
    let out = scrape_metrics(&format!("127.0.0.1:{port}")).await?;
    Some(
        out.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// Connects `user` through HAProxy, trying again while HAProxy has no node
/// up yet (its health checks run every second).
async fn phone_through(url: &str, user: &str) -> videocall_tests::Phone {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    for _ in 0..120 {
        tick.tick().await;
        let connect =
            client_sdk::Client::connect(url.to_owned(), client_sdk::Credentials::dev_user(user));
        if let Ok((client, events)) = connect.await {
            return videocall_tests::Phone {
                user: user.to_owned(),
                client,
                events,
            };
        }
    }
    panic!("{user} cannot connect through HAProxy at {url}");
}

#[tokio::test]
async fn a_compose_cluster_keeps_a_call_through_the_loss_of_a_node_container() {
    let _serial = SERIAL.lock().await;
    docker_or_fail();
    build_images(&[
        ("call-service", CALL_IMAGE),
        ("business-service", BUSINESS_IMAGE),
        ("redis", REDIS_IMAGE),
        ("haproxy", HAPROXY_IMAGE),
    ]);
    let (client_port, admin_port) = (free_port().await, free_port().await);
    let business_metrics_port = free_port().await;
    let nodes = ["call-1", "call-2", "call-3"];
    let mut node_metrics = Vec::new();
    for _ in nodes {
        node_metrics.push(free_port().await);
    }
    let mut env: Vec<(String, String)> = vec![
        ("VIDEOCALL_CALL_IMAGE".into(), CALL_IMAGE.into()),
        ("VIDEOCALL_BUSINESS_IMAGE".into(), BUSINESS_IMAGE.into()),
        ("VIDEOCALL_REDIS_IMAGE".into(), REDIS_IMAGE.into()),
        ("VIDEOCALL_HAPROXY_IMAGE".into(), HAPROXY_IMAGE.into()),
        ("VIDEOCALL_CLIENT_PORT".into(), client_port.to_string()),
        ("VIDEOCALL_ADMIN_PORT".into(), admin_port.to_string()),
        (
            "VIDEOCALL_BUSINESS_METRICS_PORT".into(),
            business_metrics_port.to_string(),
        ),
        ("VIDEOCALL_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
    ];
    for (i, port) in node_metrics.iter().enumerate() {
        env.push((
            format!("VIDEOCALL_NODE{}_METRICS_PORT", i + 1),
            port.to_string(),
        ));
    }
    let compose = Compose {
        project: format!("videocallcluster{}", std::process::id()),
        file: Some("docker-compose.cluster.yml"),
        env,
    };
    run(&mut compose.cmd(&["up", "-d", "--no-build"]));
    compose.healthy("redis").await;
    compose.healthy("business-service").await;
    for node in nodes {
        compose.healthy(node).await;
    }

    // Alice and bob talk through HAProxy (least connections: on two nodes).
    let url = format!("http://127.0.0.1:{client_port}");
    let mut alice = phone_through(&url, "alice").await;
    let mut bob = phone_through(&url, "bob").await;
    let room = talking(&mut alice, &mut bob).await;
    let devices = (
        alice.client.connection_id().to_owned(),
        bob.client.connection_id().to_owned(),
    );

    // The node container with a device of theirs on it is killed.
    let mut on = None;
    for (node, port) in nodes.iter().zip(&node_metrics) {
        if metric(*port, "videocall_connected_devices").await >= Some(1.0) {
            on = Some(*node);
            break;
        }
    }
    let on = on.expect("no node says it holds alice's or bob's device");
    run(Command::new("docker").args(["kill", "-s", "KILL", &compose.container(on)]));

    // Both come back through HAProxy (the SDK reconnects by itself) as the
    // same devices, resumed on the nodes left; neither hears anything.
    alice.back(Duration::from_secs(30)).await;
    bob.back(Duration::from_secs(30)).await;
    assert_eq!(alice.client.connection_id(), devices.0, "alice resumed");
    assert_eq!(bob.client.connection_id(), devices.1, "bob resumed");
    alice.assert_quiet().await;
    bob.assert_quiet().await;

    // HAProxy's gRPC health check found the dead node and took it out.
    let down = format!("call-nodes/{on} is DOWN");
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut logs = String::new();
    for _ in 0..80 {
        tick.tick().await;
        let out = run(&mut compose.cmd(&["logs", "--no-color", "haproxy"]));
        logs = String::from_utf8_lossy(&out.stdout).into_owned();
        if logs.contains(&down) {
            break;
        }
    }
    assert!(
        logs.contains(&down),
        "HAProxy did not mark {on} down:\n{logs}"
    );
    for node in nodes.iter().filter(|n| **n != on) {
        assert!(
            !logs.contains(&format!("call-nodes/{node} is DOWN")),
            "{node} is alive:\n{logs}"
        );
    }

    // The call goes on: bob hangs up, alice hears it.
    assert_eq!(bob.client.finish("alice").await.expect("finish"), Code::OK);
    let f = alice.expect(EventKind::Finish, "bob", Code::OK).await;
    assert_eq!(f.room_id().unwrap_or(room), room);
    bob.expect(EventKind::Finish, "alice", Code::OK).await;
    // And new calls are placed on the nodes left.
    alice.call("bob").await;
    bob.expect(EventKind::Request, "alice", Code::OK).await;
}
