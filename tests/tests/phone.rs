//! Two terminal phones call each other through the real services, driven
//! the way a person would: keys typed into tmux, the screen read back.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use videocall_tests::process::binaries;
use videocall_tests::{Business, CallService};

/// A private tmux server (one per test: tests run side by side), killed
/// when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(test: &str) -> Self {
        let ok = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "tmux is needed for this test (apt-get install tmux)");
        Self {
            socket: format!("videocall-phone-test-{}-{test}", std::process::id()),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn open(&self, name: &str, phone: &Path, url: &str) {
        self.open_with(name, phone, url, "");
    }

    /// Like [`Tmux::open`], with more of the phone's options.
    fn open_with(&self, name: &str, phone: &Path, url: &str, options: &str) {
        let cmd = format!("{} --url {url} --user {name} {options}", phone.display());
        self.run(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "150",
            "-y",
            "40",
            &cmd,
        ]);
    }

    fn type_line(&self, pane: &str, text: &str) {
        self.run(&["send-keys", "-t", pane, "-l", text]);
        self.run(&["send-keys", "-t", pane, "Enter"]);
    }

    fn screen(&self, pane: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", pane])
    }

    /// Waits until `pane` shows `text`. The phone is another program with
    /// its own timing: look every 50 ms, for at most 10 s.
    async fn wait_for(&self, pane: &str, text: &str) -> String {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        for _ in 0..200 {
            tick.tick().await;
            let screen = self.screen(pane);
            if screen.contains(text) {
                return screen;
            }
        }
        panic!(
            "{pane}'s screen never showed {text:?}:\n{}",
            self.screen(pane)
        );
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

#[tokio::test]
async fn two_phones_call_each_other_in_tmux() {
    let phone = binaries().join("phone");
    let business = Business::start(&[("mallory", 200_001)]).await;
    let svc = CallService::start(Some(&business.url), |_| {}).await;
    let tmux = Tmux::new("two-phones");
    tmux.open("alice", &phone, &svc.client_url);
    tmux.open("bob", &phone, &svc.client_url);
    tmux.wait_for("alice", "connected").await;
    tmux.wait_for("bob", "connected").await;

    // alice dials; bob sees who calls and the message.
    tmux.type_line("alice", "call bob Hi Bob, got a minute?");
    tmux.wait_for("alice", "calling bob ...").await;
    tmux.wait_for("bob", "alice is calling: \"Hi Bob, got a minute?\"")
        .await;
    tmux.type_line("bob", "state");
    tmux.wait_for("bob", "alice is calling you").await;

    // bob answers: both see START with the same room.
    tmux.type_line("bob", "answer");
    tmux.wait_for("alice", "bob answered").await;
    let a = tmux.wait_for("alice", "call started with bob — room").await;
    let b = tmux.wait_for("bob", "call started with alice — room").await;
    let room = |s: &str| {
        s.lines()
            .find_map(|l| l.split("room ").nth(1).map(|r| r.trim().to_owned()))
    };
    assert_eq!(room(&a), room(&b));

    // alice hangs up: both see the reason in words.
    tmux.type_line("alice", "hangup");
    tmux.wait_for("alice", "call with bob ended: hung up").await;
    tmux.wait_for("bob", "call with alice ended: hung up").await;

    // A refusal and a rejection, in words too; mistakes get a sentence.
    tmux.type_line("alice", "call nobody");
    tmux.wait_for(
        "alice",
        "did not go through: the callee is offline (100102)",
    )
    .await;
    tmux.type_line("bob", "call alice");
    tmux.wait_for("alice", "bob is calling").await;
    tmux.type_line("alice", "reject");
    tmux.wait_for("bob", "did not go through: rejected (100104)")
        .await;
    tmux.wait_for("alice", "call with bob ended: rejected (100104)")
        .await;
    tmux.type_line("alice", "answer");
    tmux.wait_for("alice", "nobody is calling").await;
    tmux.type_line("alice", "fly away");
    tmux.wait_for("alice", "unknown command \"fly\"; type 'help'")
        .await;
    tmux.type_line("alice", "quit");
    svc.stop().await;
    business.stop().await;
}

#[tokio::test]
async fn a_callers_message_cannot_drive_the_callees_terminal() {
    let phone = binaries().join("phone");
    let svc = CallService::start(None, |_| {}).await;
    let tmux = Tmux::new("hostile-message");
    tmux.open("bob", &phone, &svc.client_url);
    tmux.wait_for("bob", "connected").await;
    let eve = svc.phone("eve").await;
    // Clear the screen, set the window title, then a forged status line.
    let hostile = "\u{1b}[2J\u{1b}]2;pwned\u{7}\r\n  ■ call with mallory ended: hung up";
    let code = eve
        .client
        .request("bob", 0, 0, hostile)
        .await
        .expect("request");
    assert!(code.is_ok(), "{code:?}");
    let screen = tmux
        .wait_for(
            "bob",
            "eve is calling: \"\\u{1b}[2J\\u{1b}]2;pwned\\u{7}\\r\\n",
        )
        .await;
    assert!(
        screen.contains("connected"),
        "the screen was cleared:\n{screen}"
    );
    assert!(
        !screen
            .lines()
            .any(|l| l.trim_start().starts_with("■ call with mallory")),
        "a forged line:\n{screen}"
    );
    let title = tmux.run(&["display-message", "-p", "-t", "bob", "#{pane_title}"]);
    assert!(!title.contains("pwned"), "title set to {title:?}");
    svc.stop().await;
}

#[tokio::test]
async fn a_phone_with_a_token_command_keeps_its_call_past_its_tokens() {
    const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";
    let bins = binaries();
    let phone = bins.join("phone");
    let minter = bins.join("business-service");
    let svc = CallService::start(None, |c| {
        c.dev_identity = false;
        c.jwt_secret = Some(SECRET.into());
        c.jwt_leeway = Duration::ZERO;
        c.refresh_ahead = Duration::from_secs(1);
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let asks = dir.path().join("asks");
    // alice's tokens live 2 to 3 s; each ask is counted in a file.
    let command = format!(
        "echo >> {asks}; {minter} token --user alice --ttl 3s --secret {SECRET}",
        asks = asks.display(),
        minter = minter.display(),
    );
    // bob's token comes from a file.
    let bob_token = dir.path().join("bob.jwt");
    let out = Command::new(&minter)
        .args(["token", "--user", "bob", "--ttl", "1h", "--secret", SECRET])
        .output()
        .expect("mint");
    std::fs::write(&bob_token, &out.stdout).expect("write");

    let tmux = Tmux::new("token-command");
    let quoted = command.replace('\'', "'\\''");
    tmux.open_with(
        "alice",
        &phone,
        &svc.client_url,
        &format!("--token-command '{quoted}'"),
    );
    tmux.open_with(
        "bob",
        &phone,
        &svc.client_url,
        &format!("--token-file {}", bob_token.display()),
    );
    tmux.wait_for("alice", "connected").await;
    tmux.wait_for("bob", "connected").await;
    tmux.type_line("alice", "call bob long one");
    tmux.wait_for("bob", "alice is calling").await;
    tmux.type_line("bob", "answer");
    tmux.wait_for("alice", "call started with bob").await;
    // The connect's token and three refreshes: well past the first's life.
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for _ in 0..400 {
        tick.tick().await;
        let n = std::fs::read_to_string(&asks).map_or(0, |t| t.lines().count());
        if n >= 4 {
            break;
        }
    }
    let n = std::fs::read_to_string(&asks).map_or(0, |t| t.lines().count());
    assert!(n >= 4, "alice's token command ran {n} times");
    tmux.type_line("alice", "state");
    tmux.wait_for("alice", "talking with bob").await;
    tmux.type_line("alice", "hangup");
    tmux.wait_for("alice", "call with bob ended: hung up").await;
    tmux.wait_for("bob", "call with alice ended: hung up").await;
    tmux.type_line("alice", "quit");
    tmux.type_line("bob", "quit");
    svc.stop().await;
}
