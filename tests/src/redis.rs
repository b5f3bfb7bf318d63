//! A `redis-server` of a test's own, on a free port, for the call service
//! nodes of a cluster (`scripts/test.sh` installs it; without it a test
//! that needs it fails).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A running `redis-server`, killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    pub url: String,
    pub port: u16,
}

/// The arguments of a `redis-server` that keeps everything in its
/// append-only file in `dir` (fsync on every write), so a restart from it
/// loses nothing.
pub fn append_only_args(dir: &str) -> Vec<String> {
    [
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--dir",
        dir,
    ]
    .map(String::from)
    .to_vec()
}

impl RedisServer {
    /// Starts one without persistence, and waits until it accepts
    /// connections (it says so; nothing is polled).
    pub fn start() -> Self {
        Self::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// Starts one with extra arguments (persistence, a directory).
    pub fn start_with(args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Self::start_on(port, args)
    }

    /// Starts one on `port` (to restart it where the nodes expect it).
    pub fn start_on(port: u16, args: &[&str]) -> Self {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server not found: install it (scripts/test.sh does: apt-get install redis-server)",
            );
        let out = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("Ready to accept connections") => break,
                Some(Ok(_)) => {}
                _ => panic!("redis-server ended before it was ready"),
            }
        }
        // Its later output is not read: keep the pipe drained.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
            port,
        }
    }

    /// The server's process id (to stop and continue it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
