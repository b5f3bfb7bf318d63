//! Running the built binaries (and example programs) as processes.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use crate::PATIENCE;

/// Builds the binaries (services, phone and load generator; a no-op when they are fresh) and returns
/// the directory they are in: the one the running test comes from.
pub fn binaries() -> PathBuf {
    let exe = std::env::current_exe().expect("test path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.current_dir(workspace()).args([
        "build",
        "--quiet",
        "-p",
        "call-service",
        "-p",
        "business-service",
        "-p",
        "phone",
        "-p",
        "videocall-bench",
        "--bins",
    ]);
    if dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "building the service binaries failed");
    dir
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A started process, with its stdout lines still to read.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub stdout: Lines<BufReader<ChildStdout>>,
    /// Set by [`Proc::start_logged`].
    pub stderr: Option<Lines<BufReader<ChildStderr>>>,
}

impl Proc {
    /// Starts `program` with `args` (logging warnings and errors to this
    /// test's stderr); it is killed when dropped.
    pub fn start(program: &Path, args: &[&str]) -> Self {
        Self::spawn(program, args, "warn", false)
    }

    /// Like [`Proc::start`], logging at `info` into [`Proc::stderr`].
    pub fn start_logged(program: &Path, args: &[&str]) -> Self {
        Self::spawn(program, args, "info", true)
    }

    fn spawn(program: &Path, args: &[&str], log: &str, capture: bool) -> Self {
        let mut child = Command::new(program)
            .args(args)
            // VIDEOCALL_TEST_LOG overrides, to see a failing test's services.
            .env(
                "RUST_LOG",
                std::env::var("VIDEOCALL_TEST_LOG").unwrap_or_else(|_| log.to_owned()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(if capture {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let stderr = child.stderr.take().map(|e| BufReader::new(e).lines());
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// The next stdout line that starts with `prefix` (others are skipped).
    pub async fn line(&mut self, prefix: &str) -> String {
        tokio::time::timeout(PATIENCE, async {
            while let Some(line) = self.stdout.next_line().await.expect("read stdout") {
                if line.starts_with(prefix) {
                    return line;
                }
            }
            panic!("the process exited before printing {prefix:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("no line {prefix:?} in time"))
    }

    /// Every remaining stdout line, once the process has exited.
    pub async fn rest(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        tokio::time::timeout(PATIENCE, async {
            while let Some(line) = self.stdout.next_line().await.expect("read stdout") {
                lines.push(line);
            }
        })
        .await
        .expect("the process did not finish in time");
        lines
    }
}

/// Starts `program` and waits for the line starting with `prefix`, which
/// carries the addresses it bound.
pub async fn spawn(program: &Path, args: &[&str], prefix: &str) -> (Child, String) {
    let mut p = Proc::start(program, args);
    let line = p.line(prefix).await;
    (p.child, line)
}

/// `key=value` out of a "listening" line.
pub fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_owned()
}

/// A port nothing listens on right now (to start or restart a service on).
pub async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    l.local_addr().expect("addr").port()
}
