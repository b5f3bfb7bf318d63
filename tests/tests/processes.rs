//! The built binaries as separate processes, the way they are deployed:
//! business-service, call-service, SDK clients, the admin subcommand, and a
//! clean exit on SIGTERM.

use client_sdk::{Code, EventKind};
use tokio::process::Command;
use videocall_tests::phone_at;
use videocall_tests::process::{Proc, binaries, field, free_port, spawn};
use videocall_tests::{PATIENCE, Phone};

/// The business-service binary on free ports, keeping its records in
/// `db`, plus `extra` flags; with its hook's URL.
async fn business_service(
    dir: &std::path::Path,
    db: &std::path::Path,
    extra: &[&str],
) -> (tokio::process::Child, String) {
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--database",
        db.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let (child, line) = spawn(
        &dir.join("business-service"),
        &args,
        "business-service listening",
    )
    .await;
    (child, format!("http://{}", field(&line, "hook")))
}

/// The call-service binary on free ports with development identities,
/// against the business hook at `hook`, plus `extra` flags; with its
/// "listening" line.
async fn call_service(
    dir: &std::path::Path,
    hook: &str,
    extra: &[&str],
) -> (tokio::process::Child, String) {
    let mut args = vec![
        "--client-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--business-url",
        hook,
        "--dev-identity",
    ];
    args.extend_from_slice(extra);
    spawn(&dir.join("call-service"), &args, "call-service listening").await
}

#[tokio::test]
async fn the_binaries_place_refuse_and_force_end_calls() {
    let dir = binaries();
    let data = tempfile::tempdir().expect("tempdir");
    let db = data.path().join("records.db");
    let policy = data.path().join("policy.toml");
    std::fs::write(&policy, "blocked_callees = [\"eve\"]\n").expect("write policy");
    let (mut business, hook) = business_service(
        &dir,
        &db,
        &[
            "--block-caller",
            "mallory",
            "--refusal-code",
            "777002",
            "--policy",
            policy.to_str().expect("utf-8 path"),
            // Only SIGHUP reloads in this test.
            "--reload-interval",
            "1h",
        ],
    )
    .await;
    let (mut calls, line) = call_service(&dir, &hook, &[]).await;
    let client_url = format!("http://{}", field(&line, "client"));
    let admin_url = format!("http://{}", field(&line, "admin"));

    let mut alice = phone_at(&client_url, "alice").await;
    let mut bob = phone_at(&client_url, "bob").await;
    let mut mallory = phone_at(&client_url, "mallory").await;

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

    // The policy file changes; SIGHUP makes the business service reload it.
    let mut eve = phone_at(&client_url, "eve").await;
    alice.call("eve").await;
    alice.expect(EventKind::Reply, "eve", Code(200_002)).await;
    std::fs::write(&policy, "# eve may be called now\n").expect("write policy");
    let pid = business.id().expect("pid").to_string();
    let hup = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .await
        .expect("kill -HUP");
    assert!(hup.success());
    // The signal is handled on the business service's own time: try again
    // until a call to eve rings.
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    loop {
        tick.tick().await;
        alice.call("eve").await;
        let e = tokio::select! {
            e = alice.next() => e,
            e = eve.next() => e,
        };
        if e.kind == EventKind::Request {
            break;
        }
        assert_eq!(e.code, Code(200_002), "{e:?}");
    }
    eve.client
        .reply("alice", Code::REJECTED)
        .await
        .expect("reject");
    alice.expect(EventKind::Reply, "eve", Code::REJECTED).await;

    // The operator CLI reads the records the service wrote (the last notice
    // is stored on the business service's own time: look until it is).
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    let mut csv = String::new();
    for _ in 0..200 {
        tick.tick().await;
        let out = Command::new(dir.join("business-service"))
            .args([
                "records",
                "--database",
                db.to_str().expect("utf-8 path"),
                "--csv",
                "missed",
                "eve",
            ])
            .output()
            .await
            .expect("run records");
        assert!(
            out.status.success(),
            "records failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        csv = String::from_utf8_lossy(&out.stdout).into_owned();
        if csv
            .lines()
            .any(|l| l.contains(",alice,eve,") && l.contains(",100104,eve,"))
        {
            break;
        }
    }
    assert!(csv.starts_with("call_id,caller,callee"), "{csv}");
    assert!(
        csv.lines()
            .any(|l| l.contains(",alice,eve,") && l.contains(",100104,eve,")),
        "{csv}"
    );
    assert!(
        csv.lines().any(|l| l.contains(",200002,business,")),
        "{csv}"
    );

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
    // The SDK tries to reconnect (the service said UNAVAILABLE), then gives
    // up: at most RECONNECT_ATTEMPTS backoffs, about 16 s.
    let end = tokio::time::timeout(PATIENCE * 3, alice.events.next())
        .await
        .expect("stream ends");
    assert!(end.is_none());
    let reason = alice.events.end_reason().expect("a reason");
    assert_eq!(reason.code(), tonic::Code::Unavailable, "{reason:?}");

    business.kill().await.expect("stop business-service");
}

/// A deploy: SIGTERM to the call service with calls talking. Every call
/// ends with TERMINATED for both parties, and the business service has
/// every call's FINISH, committed, by the time the call service has exited.
#[tokio::test]
async fn shutdown_delivers_the_last_events_of_every_call() {
    let dir = binaries();
    let data = tempfile::tempdir().expect("tempdir");
    let db = data.path().join("records.db");
    let (mut business, hook) = business_service(&dir, &db, &[]).await;
    let (mut calls, line) = call_service(&dir, &hook, &[]).await;
    let url = format!("http://{}", field(&line, "client"));
    let mut pairs = Vec::new();
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut a = phone_at(&url, &format!("caller-{i}")).await;
        let mut b = phone_at(&url, &format!("callee-{i}")).await;
        ids.push(a.call(&b.user).await);
        b.expect(EventKind::Request, &a.user, Code::OK).await;
        b.client.reply(&a.user, Code::OK).await.expect("reply");
        a.expect(EventKind::Reply, &b.user, Code::OK).await;
        a.expect(EventKind::Start, &b.user, Code::OK).await;
        b.expect(EventKind::Start, &a.user, Code::OK).await;
        pairs.push((a, b));
    }
    let pid = calls.id().expect("pid").to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(status.success());
    for (a, b) in &mut pairs {
        let (caller, callee) = (a.user.clone(), b.user.clone());
        a.expect(EventKind::Finish, &callee, Code::TERMINATED).await;
        b.expect(EventKind::Finish, &caller, Code::TERMINATED).await;
    }
    let exit = tokio::time::timeout(PATIENCE, calls.wait())
        .await
        .expect("exit in time")
        .expect("wait");
    assert!(exit.success(), "call-service exited with {exit}");
    let conn = business_service::records::open(&db).expect("open records");
    for id in &ids {
        let record =
            business_service::records::query(&conn, business_service::records::Query::Call(id), 1)
                .expect("query");
        let record = record.first().expect("a record");
        assert!(record.complete, "{record:#?}");
        assert_eq!(record.end_code, Some(Code::TERMINATED.0), "{record:#?}");
    }
    business.kill().await.expect("stop business-service");
}

/// Waits until `check` holds, looking every 100 ms for at most a minute.
/// The business service is another process that catches up on its own
/// time; there is no event to wait for.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    for _ in 0..600 {
        tick.tick().await;
        if check() {
            return;
        }
    }
    panic!("{what}: not within a minute");
}

#[tokio::test]
async fn every_call_gets_one_complete_record_across_business_restarts() {
    let dir = binaries();
    let data = tempfile::tempdir().expect("tempdir");
    let db = data.path().join("records.db");
    let db_arg = db.to_str().expect("utf-8 path").to_owned();
    let port = free_port().await;
    let listen = format!("127.0.0.1:{port}");
    let business_args = [
        "serve",
        "--listen",
        &listen,
        "--metrics-addr",
        "127.0.0.1:0",
        "--database",
        &db_arg,
    ];
    let (mut business, _) = spawn(
        &dir.join("business-service"),
        &business_args,
        "business-service listening",
    )
    .await;
    let hook = format!("http://{listen}");
    let (_calls, line) = call_service(&dir, &hook, &["--approval-deadline", "1s"]).await;
    let url = format!("http://{}", field(&line, "client"));
    let mut p: Vec<Phone> = Vec::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        p.push(phone_at(&url, user).await);
    }
    let mut ids = Vec::new();
    // Two calls talking, one ringing.
    for (a, b) in [(0, 1), (2, 3)] {
        let callee = p[b].user.clone();
        let caller = p[a].user.clone();
        ids.push(p[a].call(&callee).await);
        p[b].expect(EventKind::Request, &caller, Code::OK).await;
        p[b].client.reply(&caller, Code::OK).await.expect("reply");
        p[a].expect(EventKind::Reply, &callee, Code::OK).await;
        p[a].expect(EventKind::Start, &callee, Code::OK).await;
        p[b].expect(EventKind::Start, &caller, Code::OK).await;
    }
    ids.push(p[4].call("frank").await);
    p[5].expect(EventKind::Request, "erin", Code::OK).await;

    // The business service crashes; the calls end while it is down.
    business.kill().await.expect("kill business-service");
    p[0].client.finish("bob").await.expect("finish");
    p[0].expect(EventKind::Finish, "bob", Code::OK).await;
    p[1].expect(EventKind::Finish, "alice", Code::OK).await;
    p[5].client
        .reply("erin", Code::REJECTED)
        .await
        .expect("reject");
    p[4].expect(EventKind::Reply, "frank", Code::REJECTED).await;
    p[3].client.finish("carol").await.expect("finish");
    p[2].expect(EventKind::Finish, "dave", Code::OK).await;
    // A call attempted while it is down is refused by the failure policy,
    // and recorded too once it is back.
    ids.push(p[0].call("bob").await);
    p[0].expect(EventKind::Reply, "bob", Code::BUSINESS_UNAVAILABLE)
        .await;

    // It comes back on the same port and database; the call service
    // delivers what it missed.
    let (_business, _) = spawn(
        &dir.join("business-service"),
        &business_args,
        "business-service listening",
    )
    .await;
    let conn = business_service::records::open(&db).expect("open records");
    eventually("every call has a complete record", || {
        ids.iter().all(|id| {
            business_service::records::query(&conn, business_service::records::Query::Call(id), 1)
                .map(|r| r.first().is_some_and(|r| r.complete))
                .unwrap_or(false)
        })
    })
    .await;
    let all =
        business_service::records::query(&conn, business_service::records::Query::Recent, 100)
            .expect("query");
    assert_eq!(all.len(), ids.len(), "one record per call: {all:#?}");
    let by_id = |id: &str| all.iter().find(|r| r.call_id == id).expect("record");
    let answered = by_id(&ids[0]);
    assert!(!answered.missed && answered.duration_ms.is_some() && answered.room_id.is_some());
    assert_eq!(
        (answered.end_code, answered.ended_by.as_deref()),
        (Some(0), Some("alice"))
    );
    assert_eq!(by_id(&ids[1]).ended_by.as_deref(), Some("dave"));
    let rejected = by_id(&ids[2]);
    assert!(rejected.missed);
    assert_eq!(
        (rejected.end_code, rejected.ended_by.as_deref()),
        (Some(100_104), Some("frank"))
    );
    let refused = by_id(&ids[3]);
    assert_eq!(
        (refused.end_code, refused.missed),
        (Some(Code::BUSINESS_UNAVAILABLE.0), true)
    );
    // Every event of each call is in, whatever was delivered twice: the
    // row's bit per event type (REQUEST 1, REPLY 2, START 4, FINISH 8).
    let kinds: Vec<i64> = ids
        .iter()
        .map(|id| {
            conn.query_row(
                "SELECT kinds FROM calls WHERE call_id = ?1",
                [id.as_str()],
                |r| r.get(0),
            )
            .expect("kinds")
        })
        .collect();
    assert_eq!(kinds, [15, 15, 3, 3]);
}

/// A call service that will not run says why and exits, without first
/// printing a "listening" line that scripts would take as started.
#[tokio::test]
async fn a_configuration_that_cannot_run_is_refused_before_listening() {
    let bin = binaries().join("call-service");
    let cases: [(&[&str], &str); 3] = [
        // An open admin API beyond loopback.
        (&["--admin-addr", "0.0.0.0:0"], "--admin-token"),
        // An admin token shorter than a JWT secret may be.
        (
            &["--admin-addr", "0.0.0.0:0", "--admin-token", "a"],
            "at least 32 bytes",
        ),
        (&["--admin-token", "short-admin-token"], "at least 32 bytes"),
    ];
    for (args, why) in cases {
        let mut all = vec![
            "--client-addr",
            "127.0.0.1:0",
            "--no-metrics",
            "--dev-identity",
        ];
        all.extend_from_slice(args);
        let mut p = Proc::start_logged(&bin, &all);
        let status = tokio::time::timeout(PATIENCE, p.child.wait())
            .await
            .expect("exits")
            .expect("status");
        assert!(!status.success(), "{args:?} started");
        let stdout = p.rest().await;
        assert!(stdout.is_empty(), "{args:?} printed {stdout:?}");
        let mut stderr = Vec::new();
        let lines = p.stderr.as_mut().expect("captured");
        while let Ok(Some(l)) = lines.next_line().await {
            stderr.push(l);
        }
        assert!(
            stderr.iter().any(|l| l.contains(why)),
            "{args:?}: no {why:?} in {stderr:?}"
        );
    }
    // At 32 bytes it starts.
    let token = "x".repeat(32);
    let mut p = Proc::start(
        &bin,
        &[
            "--client-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "0.0.0.0:0",
            "--admin-token",
            &token,
            "--no-metrics",
            "--dev-identity",
        ],
    );
    p.line("call-service listening").await;
}

/// CPU seconds (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// Hardening finding 3: out of file descriptors, the accept loop backs off
/// instead of spinning a core, and the service answers again once
/// descriptors are free.
#[tokio::test]
async fn out_of_descriptors_the_service_backs_off_and_recovers() {
    let bin = binaries().join("call-service");
    let cmd = format!(
        "ulimit -n 64 && exec {} --client-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --no-metrics --dev-identity --handshake-timeout 60s",
        bin.display()
    );
    let mut p = Proc::start(std::path::Path::new("bash"), &["-c", &cmd]);
    let line = p.line("call-service listening").await;
    let addr = field(&line, "client");
    let pid = p.child.id().expect("pid");
    // More connections than descriptors: the kernel completes them, the
    // service cannot accept them all.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }
    // A measurement over one second, not a wait for an event: spinning on
    // EMFILE would use all of it.
    let before = cpu_ticks(pid);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 30,
        "{used} ticks (of 100) in one second out of descriptors"
    );
    drop(held);
    let url = format!("http://{addr}");
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    for _ in 0..200 {
        tick.tick().await;
        let Ok(channel) = tonic::transport::Endpoint::from_shared(url.clone())
            .expect("url")
            .connect()
            .await
        else {
            continue;
        };
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let check = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await;
        if check.is_ok() {
            return;
        }
    }
    panic!("the service did not answer again once descriptors were free");
}
