//! The built binaries as separate processes, the way they are deployed:
//! business-service, call-service, SDK clients, the admin subcommand, and a
//! clean exit on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use client_sdk::{Client, Code, Credentials, EventKind};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use videocall_tests::{PATIENCE, Phone};

/// Builds the service binaries (a no-op when they are fresh) and returns
/// the directory they are in: the one this test runs from.
fn binaries() -> PathBuf {
    let exe = std::env::current_exe().expect("test path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args([
            "build",
            "--quiet",
            "-p",
            "call-service",
            "-p",
            "business-service",
            "--bins",
        ]);
    if dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "building the service binaries failed");
    dir
}

/// Starts `bin` and waits for the line starting with `prefix` on its
/// stdout, which carries the addresses it bound.
async fn spawn(bin: &Path, args: &[&str], prefix: &str) -> (Child, String) {
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if line.starts_with(prefix) {
                return line;
            }
        }
        panic!("{} exited before printing {prefix:?}", bin.display());
    })
    .await
    .expect("the service did not start in time");
    (child, line)
}

/// `key=value` out of a "listening" line.
fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_owned()
}

async fn phone(url: &str, user: &str) -> Phone {
    let (client, events) = Client::connect(url.to_owned(), Credentials::dev_user(user))
        .await
        .expect("connect");
    Phone {
        user: user.into(),
        client,
        events,
    }
}

#[tokio::test]
async fn the_binaries_place_refuse_and_force_end_calls() {
    let dir = binaries();
    let (mut business, line) = spawn(
        &dir.join("business-service"),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--block-caller",
            "mallory",
            "--refusal-code",
            "777002",
        ],
        "business-service listening",
    )
    .await;
    let hook = format!("http://{}", field(&line, "hook"));
    let (mut calls, line) = spawn(
        &dir.join("call-service"),
        &[
            "--client-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--business-url",
            &hook,
            "--dev-identity",
        ],
        "call-service listening",
    )
    .await;
    let client_url = format!("http://{}", field(&line, "client"));
    let admin_url = format!("http://{}", field(&line, "admin"));

    let mut alice = phone(&client_url, "alice").await;
    let mut bob = phone(&client_url, "bob").await;
    let mut mallory = phone(&client_url, "mallory").await;

    // Refused by the business service's policy, code unchanged.
    mallory.call("bob").await;
    mallory.expect(EventKind::Reply, "bob", Code(777_002)).await;

    // A call that starts.
    alice.call("bob").await;
    bob.expect(EventKind::Request, "alice", Code::OK).await;
    bob.client.reply("alice", Code::OK).await.expect("reply");
    alice.expect(EventKind::Reply, "bob", Code::OK).await;
    let room = alice.expect(EventKind::Start, "bob", Code::OK).await.param;
    assert_eq!(
        bob.expect(EventKind::Start, "alice", Code::OK).await.param,
        room
    );

    // Forced hang-up through the admin API, from the business binary.
    let out = Command::new(dir.join("business-service"))
        .args([
            "hangup",
            "--admin-url",
            &admin_url,
            "--user",
            "bob",
            "--code",
            "200999",
            "--message",
            "time is up",
        ])
        .output()
        .await
        .expect("run hangup");
    assert!(
        out.status.success(),
        "hangup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = alice.expect(EventKind::Finish, "bob", Code(200_999)).await;
    assert_eq!(e.user_str, "time is up");
    bob.expect(EventKind::Finish, "alice", Code(200_999)).await;

    // SIGTERM: the service ends every stream and exits cleanly.
    let pid = calls.id().expect("pid").to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(PATIENCE, calls.wait())
        .await
        .expect("exit in time")
        .expect("wait");
    assert!(exit.success(), "call-service exited with {exit}");
    assert!(
        tokio::time::timeout(PATIENCE, alice.events.next())
            .await
            .expect("stream ends")
            .is_none()
    );

    business.kill().await.expect("stop business-service");
}
