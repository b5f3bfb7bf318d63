//! Real browsers for the web phone's tests: headless Chromium (Debian's
//! `chromium` and `chromium-driver`) driven through `tests/python/browser.py`
//! (Selenium). The test says what to do, one command at a time; the driver
//! only turns commands into WebDriver calls, so each test reads top to
//! bottom in Rust, next to the SDK clients it talks to.
//!
//! Waiting is for page state (`window.phone`), polled by the driver with a
//! deadline, never for time.

use std::process::Stdio;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::process::workspace;

/// How long a page may take to reach a state (a WebRTC connection on two
/// busy cores included).
pub const PAGE_PATIENCE_S: u64 = 30;

/// The driver process and its browsers; they all end when it is dropped.
#[derive(Debug)]
pub struct Browsers {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

/// One browser of [`Browsers`], by name.
#[derive(Debug)]
pub struct Page<'a> {
    browsers: &'a mut Browsers,
    name: String,
}

impl Browsers {
    /// Starts the driver. Fails the test, saying what to install, when
    /// Python has no Selenium or there is no Chromium.
    pub async fn start() -> Self {
        let python = std::env::var("VIDEOCALL_PYTHON").unwrap_or_else(|_| "python3".into());
        let ok = std::process::Command::new(&python)
            .args(["-c", "import selenium"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "{python} cannot import selenium: run the tests with ./scripts/test.sh, or pip \
             install -r tests/python/requirements.txt and set VIDEOCALL_PYTHON"
        );
        let chromium = std::env::var("VIDEOCALL_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let chromedriver =
            std::env::var("VIDEOCALL_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        for program in [&chromium, &chromedriver] {
            let found = std::process::Command::new(program)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "no {program}: apt-get install chromium chromium-driver (./scripts/test.sh does)"
            );
        }
        let mut child = Command::new(&python)
            .arg(workspace().join("tests/python/browser.py"))
            .args([
                "--chromium",
                &which(&chromium),
                "--chromedriver",
                &which(&chromedriver),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start tests/python/browser.py");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut b = Self {
            child,
            stdin,
            stdout,
        };
        assert_eq!(b.answer().await, json!("ready"));
        b
    }

    /// Sends one command and returns its value; a command that failed
    /// fails the test with the driver's message.
    pub async fn cmd(&mut self, cmd: Value) -> Value {
        let mut line = cmd.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to the browser driver");
        self.answer().await
    }

    async fn answer(&mut self) -> Value {
        // The driver answers every command within its own deadlines;
        // this bounds a hung browser.
        let patience = std::time::Duration::from_secs(PAGE_PATIENCE_S * 3);
        let line = tokio::time::timeout(patience, self.stdout.next_line())
            .await
            .expect("the browser driver did not answer in time")
            .expect("read the browser driver")
            .expect("the browser driver exited");
        let v: Value = serde_json::from_str(&line).expect("the driver writes JSON");
        if let Some(e) = v.get("error") {
            panic!("browser: {e}");
        }
        v["ok"].clone()
    }

    /// A new browser named `name`, showing `url`.
    pub async fn open(&mut self, name: &str, url: &str) -> Page<'_> {
        self.cmd(json!({ "op": "start", "name": name })).await;
        self.cmd(json!({ "op": "get", "name": name, "url": url }))
            .await;
        self.page(name)
    }

    /// The browser named `name`.
    pub fn page(&mut self, name: &str) -> Page<'_> {
        Page {
            browsers: self,
            name: name.to_owned(),
        }
    }

    /// Closes every browser and waits for the driver to exit.
    pub async fn quit(mut self) {
        self.cmd(json!({ "op": "quit" })).await;
        let _ = self.child.wait().await;
    }
}

fn which(program: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .expect("sh");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if path.is_empty() {
        program.to_owned()
    } else {
        path
    }
}

impl Page<'_> {
    async fn op(&mut self, op: &str, mut args: Value) -> Value {
        args["op"] = json!(op);
        args["name"] = json!(self.name);
        self.browsers.cmd(args).await
    }

    /// Types `text` into the input with id `id`.
    pub async fn type_in(&mut self, id: &str, text: &str) {
        self.op("type", json!({ "id": id, "text": text })).await;
    }

    /// Clicks the element with id `id`.
    pub async fn click(&mut self, id: &str) {
        self.op("click", json!({ "id": id })).await;
    }

    /// The value of a script's `return` (a promise is awaited).
    pub async fn eval(&mut self, js: &str) -> Value {
        self.op("eval", json!({ "js": js })).await
    }

    /// Waits until the script returns something truthy, and returns it.
    pub async fn wait(&mut self, js: &str) -> Value {
        self.op("wait", json!({ "js": js, "timeout": PAGE_PATIENCE_S }))
            .await
    }

    /// Waits until the phone shows `state` (signed out, connecting, idle,
    /// calling, ringing, talking).
    pub async fn wait_state(&mut self, state: &str) {
        self.wait(&format!("return phone.state === {}", json!(state)))
            .await;
    }

    /// Signs in with a development user name and waits until idle.
    pub async fn sign_in_as(&mut self, user: &str) {
        self.type_in("user", user).await;
        self.click("signin-go").await;
        self.wait_state("idle").await;
    }

    /// Dials `peer` with `message`.
    pub async fn dial(&mut self, peer: &str, message: &str) {
        self.type_in("peer", peer).await;
        self.type_in("message", message).await;
        self.click("call").await;
    }

    /// The events the page took, as `window.phone.events` (type, peer,
    /// code, callId, param).
    pub async fn events(&mut self) -> Vec<Value> {
        match self.eval("return phone.events").await {
            Value::Array(events) => events,
            other => panic!("phone.events is not a list: {other}"),
        }
    }

    /// The text of the element with id `id`.
    pub async fn text(&mut self, id: &str) -> String {
        let js = format!("return document.getElementById({}).textContent", json!(id));
        self.eval(&js).await.as_str().unwrap_or_default().to_owned()
    }

    /// Saves a PNG of the page at `path`.
    pub async fn screenshot(&mut self, path: &std::path::Path) {
        self.op("screenshot", json!({ "path": path })).await;
    }

    /// The page's console messages since the last call.
    pub async fn logs(&mut self) -> Vec<String> {
        match self.op("logs", json!({})).await {
            Value::Array(lines) => lines
                .into_iter()
                .map(|l| l.as_str().unwrap_or_default().to_owned())
                .collect(),
            _ => Vec::new(),
        }
    }
}
