//! Any language: the Rust call service with the example Python business
//! service, a Python client calling a Rust SDK client and the reverse, all
//! real processes, the whole flow including a refusal code. The Python side
//! uses only stubs generated from `proto/` by grpcio-tools.
//!
//! Needs a Python with `examples/python/requirements.txt` installed, named by
//! `VIDEOCALL_PYTHON` (`scripts/test.sh` sets one up) or found as `python3`.

use std::path::{Path, PathBuf};

use client_sdk::{Code, EventKind};
use videocall_tests::phone_at;
use videocall_tests::process::{Proc, binaries, field, spawn, workspace};

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
    let stubs = tempfile::tempdir().expect("tempdir");
    let status = std::process::Command::new(&python)
        .arg(example("generate.py"))
        .arg(stubs.path())
        .status()
        .expect("run generate.py");
    assert!(status.success(), "generating Python stubs failed");

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
