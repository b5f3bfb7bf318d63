//! Any language: the Rust call service with the example Python business
//! service, a Python client calling a Rust SDK client and the reverse, all
//! real processes, the whole flow including a refusal code; and Python
//! clients logging in with short-lived tokens that they refresh on their
//! live streams through a call longer than the tokens. The Python side uses
//! only stubs generated from `proto/` by grpcio-tools.
//!
//! Needs a Python with `examples/python/requirements.txt` installed, named by
//! `VIDEOCALL_PYTHON` (`scripts/test.sh` sets one up) or found as `python3`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use client_sdk::{Code, EventKind};
use videocall_tests::process::{Proc, binaries, field, spawn, workspace};
use videocall_tests::{CallService, PATIENCE, phone_at};

fn python() -> String {
    let python = std::env::var("VIDEOCALL_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&python)
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{python} cannot import grpc and grpc_tools: run the tests with ./scripts/test.sh, \
         or pip install -r examples/python/requirements.txt and set VIDEOCALL_PYTHON"
    );
    python
}

fn example(name: &str) -> PathBuf {
    workspace().join("examples/python").join(name)
}

/// Stubs generated from `proto/` by `generate.py`, in a directory of their
/// own.
fn generate_stubs(python: &str) -> tempfile::TempDir {
    let stubs = tempfile::tempdir().expect("tempdir");
    let status = std::process::Command::new(python)
        .arg(example("generate.py"))
        .arg(stubs.path())
        .status()
        .expect("run generate.py");
    assert!(status.success(), "generating Python stubs failed");
    stubs
}

fn py(python: &str, script: &Path, stubs: &Path, args: &[&str]) -> Proc {
    let mut all = vec![
        script.to_str().expect("utf-8 path"),
        "--stubs",
        stubs.to_str().expect("utf-8 path"),
    ];
    all.extend_from_slice(args);
    Proc::start(Path::new(python), &all)
}

#[tokio::test]
async fn python_business_service_and_python_client_with_rust() {
    let python = python();
    let bins = binaries();
    let stubs = generate_stubs(&python);

    let mut business = py(
        &python,
        &example("business_service.py"),
        stubs.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--block",
            "mallory",
            "--code",
            "777003",
        ],
    );
    let hook = format!(
        "http://{}",
        field(&business.line("python-business listening").await, "hook")
    );
    let (_calls, line) = spawn(
        &bins.join("call-service"),
        &[
            "--client-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--business-url",
            &hook,
            "--dev-identity",
        ],
        "call-service listening",
    )
    .await;
    let client_addr = field(&line, "client");
    let url = format!("http://{client_addr}");

    // A Rust SDK client calls a Python client, which answers.
    let mut bob = py(
        &python,
        &example("client.py"),
        stubs.path(),
        &["--url", &client_addr, "--user", "bob", "answer"],
    );
    bob.line("READY").await;
    let mut alice = phone_at(&url, "alice").await;
    alice.call("bob").await;
    alice.expect(EventKind::Reply, "bob", Code::OK).await;
    let room = alice.expect(EventKind::Start, "bob", Code::OK).await.param;
    assert_eq!(alice.client.finish("bob").await.expect("finish"), Code::OK);
    alice.expect(EventKind::Finish, "bob", Code::OK).await;
    assert!(bob.child.wait().await.expect("wait").success());
    let lines = bob.rest().await;
    let want = [
        "EVENT REQUEST peer=alice code=0".to_owned(),
        format!("EVENT START peer=alice code=0 param={room}"),
        "EVENT FINISH peer=alice code=0".to_owned(),
    ];
    for w in &want {
        assert!(
            lines.iter().any(|l| l.starts_with(w.as_str())),
            "python callee missed {w:?}: {lines:#?}"
        );
    }

    // A Python client calls a Rust SDK client, and hangs up after START.
    let mut carol = phone_at(&url, "carol").await;
    let mut dave = py(
        &python,
        &example("client.py"),
        stubs.path(),
        &["--url", &client_addr, "--user", "dave", "call", "carol"],
    );
    let ring = carol.expect(EventKind::Request, "dave", Code::OK).await;
    assert_eq!(
        (ring.flags, ring.user_str.as_str()),
        (3, "dave from Python")
    );
    carol.client.reply("dave", Code::OK).await.expect("reply");
    carol.expect(EventKind::Start, "dave", Code::OK).await;
    carol.expect(EventKind::Finish, "dave", Code::OK).await;
    assert!(dave.child.wait().await.expect("wait").success());
    let lines = dave.rest().await;
    for w in [
        "RESULT seq=1 code=0",
        "EVENT REPLY peer=carol code=0",
        "EVENT START peer=carol",
        "EVENT FINISH peer=carol code=0",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(w)),
            "python caller missed {w:?}: {lines:#?}"
        );
    }

    // The Python business service refuses mallory with its own code.
    let mut mallory = py(
        &python,
        &example("client.py"),
        stubs.path(),
        &["--url", &client_addr, "--user", "mallory", "call", "carol"],
    );
    assert!(mallory.child.wait().await.expect("wait").success());
    let lines = mallory.rest().await;
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("EVENT REPLY peer=carol code=777003")),
        "{lines:#?}"
    );
    carol.assert_quiet().await;

    // And it heard every event, in order, with its decisions.
    let seen: Vec<String> = {
        let mut seen = Vec::new();
        while seen
            .iter()
            .filter(|l: &&String| l.starts_with("REPLY") && l.contains("mallory"))
            .count()
            == 0
        {
            seen.push(business.line("").await);
        }
        seen
    };
    assert!(
        seen.iter().any(|l| l.starts_with("REQUEST")
            && l.contains("alice->bob")
            && l.ends_with("decision=0")),
        "{seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("START") && l.contains("alice->bob")),
        "{seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("FINISH") && l.contains("dave->carol")),
        "{seen:#?}"
    );
    assert!(
        seen.iter().any(|l| l.starts_with("REQUEST")
            && l.contains("mallory->carol")
            && l.ends_with("decision=777003")),
        "{seen:#?}"
    );
}

/// Waits (at most `within`) for a client to exit.
async fn exited(p: &mut Proc, who: &str, within: Duration) -> std::process::ExitStatus {
    tokio::time::timeout(within, p.child.wait())
        .await
        .unwrap_or_else(|_| panic!("{who}'s call did not end in time"))
        .expect("wait")
}

/// The lines of `lines` from the one starting with `start` to the one
/// starting with `finish` (both there, in that order).
fn call_lines<'a>(who: &str, lines: &'a [String], start: &str, finish: &str) -> &'a [String] {
    let at = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{who} missed {prefix:?}: {lines:#?}"))
    };
    let (s, f) = (at(start), at(finish));
    assert!(s < f, "{who}: {finish:?} before {start:?}: {lines:#?}");
    &lines[s..=f]
}

#[tokio::test]
async fn a_python_client_refreshes_its_token_through_a_long_call() {
    const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";
    let python = python();
    let minter = binaries().join("business-service");
    let stubs = generate_stubs(&python);
    // Tokens checked to the second, asked for 1 s before expiry (or
    // halfway through, for one with less than 2 s left).
    let svc = CallService::start(None, |c| {
        c.dev_identity = false;
        c.jwt_secret = Some(SECRET.into());
        c.jwt_leeway = Duration::ZERO;
        c.refresh_ahead = Duration::from_secs(1);
    })
    .await;
    let client_addr = svc.client_url.trim_start_matches("http://").to_owned();
    // Tokens of 2 to 3 s (`exp` is in whole seconds), a fresh one per run.
    let token_command = |user: &str| {
        format!(
            "{minter} token --user {user} --ttl 3s --secret {SECRET}",
            minter = minter.display()
        )
    };

    let bob_command = token_command("bob");
    let mut bob = py(
        &python,
        &example("client.py"),
        stubs.path(),
        &[
            "--url",
            &client_addr,
            "--token-command",
            &bob_command,
            "answer",
        ],
    );
    assert_eq!(bob.line("READY").await, "READY user=bob");
    // alice calls bob and holds the call 8 s: several of her tokens' lives.
    let alice_command = token_command("alice");
    let mut alice = py(
        &python,
        &example("client.py"),
        stubs.path(),
        &[
            "--url",
            &client_addr,
            "--token-command",
            &alice_command,
            "call",
            "bob",
            "--hold",
            "8",
        ],
    );
    let status = exited(&mut alice, "alice", PATIENCE * 3).await;
    assert!(status.success(), "alice exited with {status}");
    let status = exited(&mut bob, "bob", PATIENCE).await;
    assert!(status.success(), "bob exited with {status}");
    let alice_lines = alice.rest().await;
    let bob_lines = bob.rest().await;

    let alice_call = call_lines(
        "alice",
        &alice_lines,
        "EVENT START peer=bob code=0",
        "EVENT FINISH peer=bob code=0",
    );
    let bob_call = call_lines(
        "bob",
        &bob_lines,
        "EVENT START peer=alice code=0",
        "EVENT FINISH peer=alice code=0",
    );
    assert_eq!(
        field(&alice_call[0], "param"),
        field(&bob_call[0], "param"),
        "one room"
    );
    for w in ["RESULT seq=1 code=0", "EVENT REPLY peer=bob code=0"] {
        assert!(
            alice_lines.iter().any(|l| l.starts_with(w)),
            "alice missed {w:?}: {alice_lines:#?}"
        );
    }
    assert!(
        bob_lines
            .iter()
            .any(|l| l.starts_with("EVENT REQUEST peer=alice code=0")),
        "{bob_lines:#?}"
    );
    // Each side refreshed on its live stream during the call, no refresh
    // failed, and no stream ended early.
    for (who, lines, during) in [
        ("alice", &alice_lines, alice_call),
        ("bob", &bob_lines, bob_call),
    ] {
        let refreshed = during
            .iter()
            .filter(|l| l.starts_with("REFRESH-RESULT ") && l.contains(" code=0 "))
            .count();
        assert!(
            refreshed >= 2,
            "{who} refreshed {refreshed} times during the call: {lines:#?}"
        );
        assert!(
            !lines.iter().any(|l| l.starts_with("REFRESH-ERROR")
                || l.starts_with("STREAM-ERROR")
                || (l.starts_with("REFRESH-RESULT ") && !l.contains(" code=0 "))),
            "{who}: {lines:#?}"
        );
    }
    svc.stop().await;
}
