//! The load generator in smoke mode, so it keeps working: a few hundred calls
//! of every kind (answered, rejected, cancelled, unanswered) through the real
//! binaries as separate processes, every one of them as planned, and a few
//! hundred idle clients. Figures are for the benchmark (`scripts/bench.sh`);
//! nothing here is timed.

use videocall_tests::process::binaries;

/// Runs `videocall-bench` with `args` (and `--json`), asserts it succeeded
/// and returns the JSON document it wrote and its stdout.
async fn bench(args: &[&str]) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("result.json");
    let out = tokio::process::Command::new(binaries().join("videocall-bench"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run videocall-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "videocall-bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc =
        serde_json::from_slice(&std::fs::read(&json).expect("JSON written")).expect("valid JSON");
    (doc, stdout)
}

#[tokio::test]
async fn the_load_generator_places_every_kind_of_call_without_failures() {
    let (doc, stdout) = bench(&[
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
        "--quiet",
        "--require-clean",
    ])
    .await;
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
    assert!(r["generator_cpu_s"].as_f64().unwrap() > 0.0);
    assert!(stdout.contains("REQUEST→START"), "{stdout}");
}

/// The idle-clients mode: 300 clients, `shared` shared connections (0:
/// each its own), 20 calls among them, and `more` arguments.
async fn idle_clients(shared: usize, more: &[&str]) -> (serde_json::Value, String) {
    let shared = shared.to_string();
    let mut args = vec![
        "connections",
        "--clients",
        "300",
        "--active-calls",
        "20",
        "--quiet",
        "--shared-connections",
        &shared,
    ];
    args.extend_from_slice(more);
    bench(&args).await
}

/// The idle-clients mode, once with a connection per client and once with
/// the clients' streams sharing a few connections: every client connects,
/// the service counts them all, and calls among them reach the talking state.
#[tokio::test]
async fn the_load_generator_connects_idle_clients_on_their_own_or_shared_connections() {
    for shared in [0, 4] {
        let (doc, stdout) = idle_clients(shared, &["--sources", "2"]).await;
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

/// The idle-clients mode over three nodes on one Redis: the clients are
/// spread over the nodes in turn (each holds a third), on their own
/// connections and on shared ones, and calls among them (between nodes)
/// reach the talking state. Needs `redis-server` (the README's test command
/// installs it).
#[tokio::test]
async fn the_load_generator_spreads_idle_clients_over_a_clusters_nodes() {
    for shared in [0, 6] {
        let (doc, stdout) = idle_clients(shared, &["--nodes", "3"]).await;
        let r = &doc["result"];
        assert_eq!(r["nodes"], 3);
        assert_eq!(r["connected"], 300, "{stdout}");
        assert_eq!(r["server_reports_connected"], 300.0, "{stdout}");
        let per_node: Vec<f64> = r["node_reports_connected"]
            .as_array()
            .expect("per node")
            .iter()
            .map(|n| n.as_f64().expect("a count"))
            .collect();
        assert_eq!(per_node, [100.0, 100.0, 100.0], "{stdout}");
        assert_eq!(r["active_calls"], 20, "{stdout}");
    }
}

/// The floor relay (`--floor`) serves the same clients: answered and
/// rejected calls go through it with approval by the business service, every
/// one as planned; a plan it cannot relay (cancelling needs call state) is
/// refused up front.
#[tokio::test]
async fn the_floor_relay_carries_answered_and_rejected_calls_and_refuses_other_plans() {
    let (doc, stdout) = bench(&[
        "calls",
        "--floor",
        "--rate",
        "150",
        "--calls",
        "300",
        "--pairs",
        "60",
        "--reject",
        "0.2",
        "--quiet",
        "--require-clean",
    ])
    .await;
    let r = &doc["result"];
    assert_eq!(r["completed"], 300, "{stdout}");
    assert_eq!(r["failed"], 0);
    let answered = r["answered"].as_u64().unwrap();
    let rejected = r["rejected"].as_u64().unwrap();
    assert!(answered > 0 && rejected > 0, "{stdout}");
    assert_eq!(answered + rejected, 300);
    assert_eq!(r["request_to_start"]["count"].as_u64(), Some(answered));
    let names: Vec<&str> = r["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect();
    assert_eq!(names, ["floor-relay", "business-service"]);

    let out = tokio::process::Command::new(binaries().join("videocall-bench"))
        .args(["calls", "--floor", "--cancel", "0.1", "--calls", "10"])
        .output()
        .await
        .expect("run videocall-bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("need call state"), "{stderr}");
}
