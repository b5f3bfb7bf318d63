//! The load generator in smoke mode, so it keeps working: a few hundred calls
//! of every kind (answered, rejected, cancelled, unanswered) through the real
//! binaries as separate processes, every one of them as planned. Figures are
//! for the benchmark (`scripts/bench.sh`); nothing here is timed.

use videocall_tests::process::binaries;

#[tokio::test]
async fn the_load_generator_places_every_kind_of_call_without_failures() {
    let bin = binaries();
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("calls.json");
    let out = tokio::process::Command::new(bin.join("videocall-bench"))
        .args([
            "calls",
            "--rate",
            "150",
            "--calls",
            "300",
            "--pairs",
            "60",
            "--reject",
            "0.1",
            "--cancel",
            "0.1",
            "--no-answer",
            "0.05",
            "--ring-timeout",
            "300ms",
            "--records",
            "--quiet",
            "--require-clean",
            "--json",
        ])
        .arg(&json)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run videocall-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "videocall-bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("JSON written")).expect("valid JSON");
    let r = &doc["result"];
    assert_eq!(doc["mode"], "calls");
    assert_eq!(r["offered"], 300);
    assert_eq!(r["completed"], 300, "{stdout}");
    assert_eq!(r["failed"], 0);
    assert_eq!(r["not_started"], 0);
    assert_eq!(r["notices_dropped"], 0.0);
    assert_eq!(r["clean"], true);
    // Every kind of call happened.
    for kind in ["answered", "rejected", "cancelled", "timed_out"] {
        assert!(r[kind].as_u64().unwrap() > 0, "no {kind} calls: {stdout}");
    }
    let answered = r["answered"].as_u64().unwrap();
    assert_eq!(r["request_to_start"]["count"].as_u64(), Some(answered));
    assert_eq!(r["finish_to_finished"]["count"].as_u64(), Some(answered));
    // The servers' cost was read from /proc.
    let procs = r["processes"].as_array().expect("processes");
    assert_eq!(procs.len(), 2);
    assert!(
        procs
            .iter()
            .all(|p| p[1]["peak_rss_kib"].as_u64().unwrap() > 0)
    );
    assert!(stdout.contains("REQUEST→START"), "{stdout}");
}

/// The idle-clients mode, once with a connection per client and once with
/// the clients' streams sharing a few connections: every client connects,
/// the service counts them all, and calls among them reach the talking state.
#[tokio::test]
async fn the_load_generator_connects_idle_clients_on_their_own_or_shared_connections() {
    for shared in [0, 4] {
        let bin = binaries();
        let dir = tempfile::tempdir().expect("tempdir");
        let json = dir.path().join("connections.json");
        let out = tokio::process::Command::new(bin.join("videocall-bench"))
            .args(["connections", "--clients", "300", "--active-calls", "20"])
            .args(["--sources", "2", "--quiet", "--shared-connections"])
            .arg(shared.to_string())
            .arg("--json")
            .arg(&json)
            .kill_on_drop(true)
            .output()
            .await
            .expect("run videocall-bench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "videocall-bench failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).expect("JSON")).expect("valid JSON");
        let r = &doc["result"];
        assert_eq!(doc["mode"], "connections");
        assert_eq!(r["shared_connections"], shared);
        assert_eq!(r["connected"], 300, "{stdout}");
        assert_eq!(r["failed"], 0, "{stdout}");
        assert_eq!(r["server_reports_connected"], 300.0, "{stdout}");
        assert_eq!(r["active_calls"], 20, "{stdout}");
        assert!(r["server_rss_connected_kib"].as_u64().unwrap() > 0);
    }
}
