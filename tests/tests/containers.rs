//! The containers, run for real: images built from the repository's
//! Dockerfile on a local Debian bookworm base (no registry needed), the pair
//! started with `docker-compose up`, real clients calling in from the host
//! (approval, refusal, forced hang-up), the business-service container
//! restarted and its call records found again in its volume.
//!
//! Fails where no Docker engine answers: a test that cannot run never
//! passes.

use std::process::{Command, Output};
use std::time::Duration;

use client_sdk::{Code, EventKind};
use videocall_tests::phone_at;
use videocall_tests::process::{binaries, free_port, workspace};

const BASE: &str = "videocall-base:bookworm";
const CALL_IMAGE: &str = "videocall/call-service:test";
const BUSINESS_IMAGE: &str = "videocall/business-service:test";
const ADMIN_TOKEN: &str = "container-test-admin-secret-0123456789";

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

/// `docker-compose -p PROJECT` with the test's images and ports; brought
/// down (volumes too) when dropped.
struct Compose {
    project: String,
    env: Vec<(String, String)>,
}

impl Compose {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker-compose");
        c.current_dir(workspace())
            .args(["-p", &self.project])
            .args(args);
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
    let docker = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    // A machine without Docker fails this test rather than pass it unrun.
    assert!(
        docker.is_ok_and(|o| o.status.success()),
        "no Docker engine answers (`docker info` failed): the container test cannot run"
    );
    let root = workspace();
    // The base image users would pull as debian:bookworm-slim, built locally.
    run(Command::new(root.join("scripts/docker-base.sh")).arg(BASE));
    // The runtime stages from binaries cargo built on the host.
    let bins = binaries();
    let staged = root.join("target/docker");
    std::fs::create_dir_all(&staged).expect("target/docker");
    for b in ["call-service", "business-service"] {
        std::fs::copy(bins.join(b), staged.join(b)).expect("stage binary");
    }
    for (target, tag) in [
        ("call-service", CALL_IMAGE),
        ("business-service", BUSINESS_IMAGE),
    ] {
        run(Command::new("docker").current_dir(&root).args([
            "build",
            "-q",
            "--build-arg",
            &format!("RUST_IMAGE={BASE}"),
            "--build-arg",
            &format!("RUNTIME_IMAGE={BASE}"),
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

    let (client_port, admin_port) = (free_port().await, free_port().await);
    let (metrics_port, business_metrics_port) = (free_port().await, free_port().await);
    let compose = Compose {
        project: format!("videocalltest{}", std::process::id()),
        env: vec![
            ("VIDEOCALL_CALL_IMAGE".into(), CALL_IMAGE.into()),
            ("VIDEOCALL_BUSINESS_IMAGE".into(), BUSINESS_IMAGE.into()),
            ("VIDEOCALL_CLIENT_PORT".into(), client_port.to_string()),
            ("VIDEOCALL_ADMIN_PORT".into(), admin_port.to_string()),
            ("VIDEOCALL_METRICS_PORT".into(), metrics_port.to_string()),
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
